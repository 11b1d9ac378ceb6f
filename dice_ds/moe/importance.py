"""Token importance for conditional communication: which of a token's two routed slots is skipped.

Owns the pure tensor functions that turn a router's output into slot ids and skip masks
(spec §2.5).
No process group, no state: the 'rand' strategy takes an explicit ``torch.Generator`` owned by the
caller's per-run state (spec pitfall 10), so a mask is reproducible from (inputs, generator state).

Shape legend: T tokens on this rank (flattened batch x sequence), E routed experts.
- ``probs_TE``: router probabilities (float). Only the routed entries are read.
- ``routing_map_TE``: bool, True where the token is routed to the expert; exactly 2 per row.
- ``hi_T`` / ``lo_T``: expert id (int64) of each token's higher- / lower-scored routed slot.
- ``skipped_TE``: bool, True on exactly one routed slot per token.

Invariants: the order of a token's slots comes from ``torch.topk(..., sorted=True)`` on the masked
probabilities, never from an assumed top-k order (pitfall 11); equal scores are broken towards the
lower expert id for the higher slot, so the result never depends on the top-k kernel. Only top-2
routing is supported; other k raise ``ValueError``.
"""

from __future__ import annotations

import torch

from dice_ds.ds_config import SKIP_STRATEGIES

STRATEGIES = SKIP_STRATEGIES  # the settings tree's list (dice_ds/ds_config.py)


def _check_top2(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> None:
    if probs_TE.dim() != 2 or probs_TE.shape != routing_map_TE.shape:
        raise ValueError(f"probs {tuple(probs_TE.shape)} and routing map "
                         f"{tuple(routing_map_TE.shape)} must both be [tokens, experts]")
    if probs_TE.shape[1] < 2:
        raise ValueError(f"conditional communication needs top-2 routing over >= 2 experts, got "
                         f"{probs_TE.shape[1]} experts")
    if routing_map_TE.dtype != torch.bool:
        raise ValueError(f"routing_map must be bool, got {routing_map_TE.dtype}")
    per_token = routing_map_TE.sum(dim=1)
    if per_token.numel() and not bool((per_token == 2).all()):
        bad = sorted(set(per_token.tolist()) - {2})
        raise ValueError(f"conditional communication needs top-2 routing (exactly 2 experts per "
                         f"token); found tokens routed to {bad} experts")


def slot_experts(probs_TE: torch.Tensor,
                 routing_map_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids of each token's higher- and lower-scored routed slot: ``(hi_T, lo_T)``."""
    _check_top2(probs_TE, routing_map_TE)
    masked_TE = probs_TE.float().masked_fill(~routing_map_TE, float("-inf"))
    vals_T2, ids_T2 = torch.topk(masked_TE, k=2, dim=1, sorted=True)
    hi_T, lo_T = ids_T2[:, 0], ids_T2[:, 1]
    tie_T = vals_T2[:, 0] == vals_T2[:, 1]
    hi_T, lo_T = (torch.where(tie_T, torch.minimum(hi_T, lo_T), hi_T),
                  torch.where(tie_T, torch.maximum(hi_T, lo_T), lo_T))
    return hi_T, lo_T


def skip_map(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, strategy: str,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool ``skipped_TE`` with exactly one skipped routed slot per token.

    'low' skips the lower-scored slot (DICE's choice), 'high' the higher-scored one, 'rand' one of
    the two with probability 1/2 each, drawn from ``generator`` (required; T draws per call, so
    the caller's generator state fully determines the mask sequence).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"skip strategy {strategy!r}: use one of {STRATEGIES}")
    hi_T, lo_T = slot_experts(probs_TE, routing_map_TE)
    if strategy == "low":
        skip_T = lo_T
    elif strategy == "high":
        skip_T = hi_T
    else:
        if generator is None:
            raise ValueError("skip strategy 'rand' needs an explicit torch.Generator "
                             "(per-run state)")
        coin_T = torch.randint(0, 2, (hi_T.numel(),), generator=generator,
                               device=generator.device).to(hi_T.device).bool()
        skip_T = torch.where(coin_T, hi_T, lo_T)
    skipped_TE = torch.zeros_like(routing_map_TE)
    skipped_TE.scatter_(1, skip_T.unsqueeze(1), True)
    return skipped_TE
