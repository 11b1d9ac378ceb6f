"""Routed-expert helpers that treat both expert implementations alike.

Owns ``expert_weight_views`` (per-expert weights, used by ``dice_ds.models.init_weights``) and
``is_routed_expert_param`` (parameter-name test). The implementations are megatron's
``SequentialMLP`` and dice_ds's ``GroupedExperts`` (``dice_ds/mcore/experts.py``: stacked weights
``fc1_weight`` [L, 2F, D], ``fc2_weight`` [L, D, F], two grouped GEMMs), picked by
``ModelConfig.experts_impl``.
"""

from __future__ import annotations

import torch

_EXPERT_PARAM_MARK = ".moe.experts."


def is_routed_expert_param(name: str) -> bool:
    """True for a model parameter name of a routed expert, in either implementation.

    (``blocks.b.moe.experts.local_experts.i.linear_fc1.weight`` or ``blocks.b.moe.experts.fc1_weight``;
    shared experts live under ``.moe.shared_experts.``.)
    """
    return _EXPERT_PARAM_MARK in name


def expert_weight_views(experts: torch.nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """Per local expert, its weights as (fc1 [2F, D], fc2 [D, F]) tensors that alias the module's.

    Works for megatron's ``SequentialMLP`` (its experts' parameters, fc1 first) and for
    ``GroupedExperts`` (slices of the stacked weights), so initialisation writes the same values
    into both.
    """
    if getattr(experts, "stacked_weights", False):
        return [(experts.fc1_weight[i], experts.fc2_weight[i])
                for i in range(experts.num_local_experts)]
    return [tuple(expert.parameters()) for expert in experts.local_experts]
