"""The DiT-MoE FFN as a megatron-core ``MoELayer``: its module spec and the layer class.

Owns ``moe_submodules`` (the spec) and ``DiTMoELayer`` / ``build_moe_layer`` (spec §1.1 "MoE FFN"):

- router: ``TopKRouter``, softmax over all experts *before* top-k, top-2, no renormalisation
  (``dice_ds/mcore/config.py``);
- routed experts: SwiGLU without bias, intermediate 4h; ``ModelConfig.experts_impl`` picks
  ``SequentialMLP`` of megatron ``MLP``s (``linear_fc1`` = cat(gate_proj, up_proj), ``linear_fc2`` =
  down_proj) or ``GroupedExperts`` (``dice_ds/mcore/experts.py``: the same weights stacked, two
  grouped GEMMs); both multiply the router probability inside the activation, before fc2;
- shared expert: SwiGLU of 2h, added unweighted (``moe_shared_expert_gate`` off);
- dispatcher: megatron's all-to-all dispatcher (dropless). With EP=1 it communicates nothing.

``DiTMoELayer`` only adapts shapes ([N, T, D] <-> megatron's [S, B, D]) and offers a seam
(``runtime``) through which the DICE expert-parallel runtime (``dice_ds.moe.runtime``) takes over a
layer's forward.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from dice_ds.config import ModelConfig
from dice_ds.mcore.config import transformer_config
from dice_ds.mcore.experts import GroupedExperts


def moe_submodules(experts_impl: str = "sequential") -> MoESubmodules:
    """The MoE layer's spec: routed experts of ``experts_impl`` and a SwiGLU shared expert."""
    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if experts_impl == "grouped":
        experts = ModuleSpec(module=GroupedExperts)
    else:
        experts = ModuleSpec(module=SequentialMLP, submodules=mlp)
    return MoESubmodules(
        experts=experts,
        shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=mlp),
    )


class DiTMoELayer(MoELayer):
    """megatron ``MoELayer`` taking [N, T, D] tokens; ``runtime`` may take over the forward."""

    runtime = None  # set by dice_ds.parallel when a DICE expert-parallel plan is applied
    moe_index: int = 0  # 0-based index of this MoE layer in the model

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, t, d = x_NTD.shape
        h_S1D = x_NTD.reshape(n * t, 1, d)
        if self.runtime is not None:
            out = self.runtime.moe_forward(self, h_S1D)
        else:
            out, _ = super().forward(h_S1D)
        return out.view(n, t, d)


def build_moe_layer(cfg: ModelConfig, pg_collection, moe_index: int,
                    params_dtype: torch.dtype = torch.float32) -> DiTMoELayer:
    """One DiT-MoE FFN on the given process groups (EP size = ``pg_collection.ep`` size)."""
    tcfg = transformer_config(cfg, params_dtype, ep_size=pg_collection.ep.size())
    layer = DiTMoELayer(tcfg, moe_submodules(cfg.experts_impl), layer_number=moe_index + 1,
                        pg_collection=pg_collection)
    layer.moe_index = moe_index
    return layer
