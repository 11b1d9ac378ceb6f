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

Expert placement (``dice_ds/placement.py``): with a placement other than megatron's contiguous
one the router keeps the E logical experts (its config says E) while the dispatcher and the
experts are built for the P physical slots (their config says P), and ``preprocess`` maps the
router's [T, E] output onto [T, P] (``SlotRouting``) before megatron's ``dispatch_preprocess``:
everything after it (megatron's phases, dice_ds's stale dispatchers) sees P experts.
``local_logical_experts`` names the logical expert of each local slot (the weights it holds).
Every call also counts the rows routed to each logical expert and each slot (``expert_rows_E``,
``slot_rows_P``: the routing that a balanced placement is computed from, run.json's).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from dice_ds.config import ModelConfig
from dice_ds.mcore.config import transformer_config
from dice_ds.mcore.experts import GroupedExperts
from dice_ds.placement import Placement, SlotRouting


def moe_submodules(experts_impl: str = "sequential", router_config=None) -> MoESubmodules:
    """The MoE layer's spec: routed experts of ``experts_impl`` and a SwiGLU shared expert;
    ``router_config``: the router's own config (the logical experts of a placement) instead of
    the layer's."""
    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if experts_impl == "grouped":
        experts = ModuleSpec(module=GroupedExperts)
    else:
        experts = ModuleSpec(module=SequentialMLP, submodules=mlp)
    out = MoESubmodules(
        experts=experts,
        shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=mlp),
    )
    if router_config is not None:
        out.router = functools.partial(_logical_router, router_config)
    return out


def _logical_router(router_config, *, config, pg_collection):
    """megatron's router over the logical experts (``router_config``), not the layer's slots."""
    return TopKRouter(config=router_config, pg_collection=pg_collection)


class DiTMoELayer(MoELayer):
    """megatron ``MoELayer`` taking [N, T, D] tokens; ``runtime`` may take over the forward."""

    runtime = None  # set by dice_ds.parallel when a DICE expert-parallel plan is applied
    moe_index: int = 0  # 0-based index of this MoE layer in the model
    slot_routing: SlotRouting | None = None  # set by build_moe_layer for a non-contiguous placement
    expert_rows_E = None  # rows routed to each logical expert, summed over calls (int64 [E])
    slot_rows_P = None  # rows routed to each physical slot, summed over calls (int64 [P])

    @property
    def local_logical_experts(self) -> tuple[int, ...]:
        """The logical expert of each local slot, in local order (whose weights it holds)."""
        if self.slot_routing is None:
            return tuple(int(i) for i in self.local_expert_indices)
        return tuple(self.slot_routing.slot_experts[i] for i in self.local_expert_indices)

    def row_experts(self, routing_map: torch.Tensor) -> torch.Tensor:
        """The logical expert of every row permuted by the last ``preprocess`` of the logical
        ``routing_map`` [T, E] (megatron's permutation is expert-major, tokens ascending; under a
        placement slot-major, read from the dispatcher's physical map): [R] int64."""
        if self.slot_routing is not None:
            return self.slot_routing.row_experts(self.token_dispatcher.routing_map)
        experts = torch.arange(routing_map.shape[1], device=routing_map.device)
        return torch.repeat_interleave(experts, routing_map.sum(dim=0))

    def preprocess(self, hidden_states, probs, routing_map):
        """megatron's ``preprocess`` on the physical slots (module doc); counts the rows."""
        self.expert_rows_E = _added(self.expert_rows_E, routing_map)
        if self.slot_routing is not None:
            probs, routing_map = self.slot_routing.route(probs, routing_map)
        self.slot_rows_P = _added(self.slot_rows_P, routing_map)
        return super().preprocess(hidden_states, probs, routing_map)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, t, d = x_NTD.shape
        h_S1D = x_NTD.reshape(n * t, 1, d)
        if self.runtime is not None:
            out = self.runtime.moe_forward(self, h_S1D)
        else:
            out, _ = super().forward(h_S1D)
        return out.view(n, t, d)


def _added(total, routing_map):
    rows = routing_map.sum(dim=0)
    return rows if total is None else total + rows


def build_moe_layer(cfg: ModelConfig, pg_collection, moe_index: int,
                    params_dtype: torch.dtype = torch.float32,
                    placement: Placement | None = None) -> DiTMoELayer:
    """One DiT-MoE FFN on the given process groups (EP size = ``pg_collection.ep`` size), its
    experts placed by ``placement`` (None: megatron's contiguous placement)."""
    ep = pg_collection.ep.size()
    tcfg = transformer_config(cfg, params_dtype, ep_size=ep)
    if placement is None or placement.is_contiguous:
        layer = DiTMoELayer(tcfg, moe_submodules(cfg.experts_impl), layer_number=moe_index + 1,
                            pg_collection=pg_collection)
    else:
        pcfg = transformer_config(cfg, params_dtype, ep_size=ep,
                                  num_experts=placement.num_physical)
        layer = DiTMoELayer(pcfg, moe_submodules(cfg.experts_impl, router_config=tcfg),
                            layer_number=moe_index + 1, pg_collection=pg_collection)
        layer.slot_routing = SlotRouting(placement.slot_experts(moe_index),
                                         placement.slots_per_rank, pg_collection.ep.rank())
    layer.moe_index = moe_index
    return layer
