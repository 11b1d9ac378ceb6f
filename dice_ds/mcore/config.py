"""The one place where a ``ModelConfig`` becomes a megatron-core ``TransformerConfig``.

Owns ``transformer_config`` (spec §1.1 "MoE FFN"): router softmax over all experts before top-k, no
renormalisation, fp32 router; dropless all-to-all dispatcher; SwiGLU experts without bias; shared
expert added unweighted; parameters created on CPU and left uninitialised (dice_ds initialises or
loads every weight itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from dice_ds.config import ModelConfig


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                       ep_size: int = 1, num_experts: int | None = None) -> TransformerConfig:
    """megatron ``TransformerConfig`` for the MoE layers of ``cfg`` at expert-parallel size
    ``ep_size``; ``num_experts``: megatron's expert count when it is not ``cfg.num_experts`` (the
    physical slots of an expert placement, ``dice_ds/placement.py``)."""
    return TransformerConfig(
        num_layers=cfg.depth,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.expert_ffn_size,
        moe_ffn_hidden_size=cfg.expert_ffn_size,
        num_moe_experts=cfg.num_experts if num_experts is None else num_experts,
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
