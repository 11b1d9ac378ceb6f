"""The DiT-MoE FFN as a megatron-core ``MoELayer``: config translation and layer construction.

Owns the one place where a ``ModelConfig`` becomes a megatron ``TransformerConfig`` and the MoE
module tree (spec §1.1 "MoE FFN"):

- router: ``TopKRouter``, softmax over all experts *before* top-k, top-2, no renormalisation;
- routed experts: SwiGLU without bias, intermediate 4h; ``ModelConfig.experts_impl`` picks
  ``SequentialMLP`` of megatron ``MLP``s (``linear_fc1`` = cat(gate_proj, up_proj), ``linear_fc2`` =
  down_proj) or ``GroupedExperts`` (``dice_ds/models/experts.py``: the same weights stacked, two
  grouped GEMMs); both multiply the router probability inside the activation, before fc2;
- shared expert: SwiGLU of 2h, added unweighted (``moe_shared_expert_gate`` off);
- dispatcher: megatron's all-to-all dispatcher (dropless). With EP=1 it communicates nothing.

``DiTMoELayer`` only adapts shapes ([N, T, D] <-> megatron's [S, B, D]) and offers a seam
(``runtime``) through which the DICE expert-parallel runtime takes over a layer's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dice_ds.config import ModelConfig


def build_transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                             ep_size: int = 1):
    """megatron ``TransformerConfig`` for the MoE layers of ``cfg``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.depth,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.expert_ffn_size,
        moe_ffn_hidden_size=cfg.expert_ffn_size,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.top_k,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=True,  # softmax over all E, then top-k: raw probabilities
        moe_router_load_balancing_type="none",
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_shared_expert_intermediate_size=cfg.shared_ffn_size,
        moe_shared_expert_gate=False,
        expert_model_parallel_size=ep_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        use_cpu_initialization=True,
        perform_initialization=False,  # dice_ds initialises (or loads) every weight itself
        params_dtype=params_dtype,
    )


def _moe_submodules(experts_impl: str = "sequential"):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if experts_impl == "grouped":
        from dice_ds.models.experts import grouped_experts_class

        experts = ModuleSpec(module=grouped_experts_class())
    else:
        experts = ModuleSpec(module=SequentialMLP, submodules=mlp)
    return MoESubmodules(
        experts=experts,
        shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=mlp),
    )


def _dit_moe_layer_class():
    from megatron.core.transformer.moe.moe_layer import MoELayer

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

    return DiTMoELayer


_LAYER_CLASS = None


def dit_moe_layer_class():
    """The ``DiTMoELayer`` class (built lazily so that importing dice_ds never imports megatron)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = _dit_moe_layer_class()
    return _LAYER_CLASS


def build_moe_layer(cfg: ModelConfig, pg_collection, moe_index: int,
                    params_dtype: torch.dtype = torch.float32):
    """One DiT-MoE FFN on the given process groups (EP size = ``pg_collection.ep`` size)."""
    tcfg = build_transformer_config(cfg, params_dtype, ep_size=pg_collection.ep.size())
    layer = dit_moe_layer_class()(tcfg, _moe_submodules(cfg.experts_impl), layer_number=moe_index + 1,
                                  pg_collection=pg_collection)
    layer.moe_index = moe_index
    return layer
