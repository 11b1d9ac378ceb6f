"""What an expert placement does to a prediction: the rows each EP rank computes per layer.

The plan replays a mode with each rank's expert load per (step, layer) (``dice_ds.plan.sim``
``Loads``: rows relative to the group's mean). Megatron's contiguous placement gives the loads the
bench's sync run measured per rank (``dice_ds.plan.validate.loads_of``); another placement moves
experts and replicas between ranks, so its loads come from the rows per logical expert instead:
``placed_loads`` packs them with the placement (``dice_ds.placement.rank_rows``; ``balanced``
computed from the same rows, as a run's start-up computes it from its calibration forward, or a
placement file) and gives each layer's rank rows relative to their mean, the same at every step
(routing repeats from step to step: docs/design.md "Expert placement").

The rows per expert (``expert_rows_of``) are the sync run's run.json ``expert_placement.expert_rows``
(summed over steps and ranks), or the ``expert_rows`` entry of the bench's ``.loads.json`` sidecar
once the run directories are gone. Replicas also keep rows local (``remote_share``: the bytes a
rank sends shrink with it). The memory of replicas is ``dice_ds.plan.memory``'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from dice_ds.placement import BALANCED, Placement, balanced, rank_rows
from dice_ds.plan.sim import Loads


def expert_rows_of(run_json: Path | None, sidecar: Path | None, link: str) -> list | None:
    """Rows per logical expert and layer of the sync run on ``link`` (None where not recorded)."""
    if run_json is not None and run_json.is_file():
        rec = json.loads(run_json.read_text()).get("expert_placement") or {}
        if rec.get("expert_rows"):
            return rec["expert_rows"]
    if sidecar is not None and sidecar.is_file():
        return (json.loads(sidecar.read_text()).get("expert_rows") or {}).get(link)
    return None


def remote_share(placement: Placement, rows_LE: Sequence[Sequence[float]]) -> float:
    """The share of routed rows that leave their rank under ``placement``: a token whose own rank
    holds a replica of its expert stays local (``dice_ds.placement.SlotRouting``), so with tokens
    spread evenly over the W ranks an expert with k replicas sends (W - k) / W of its rows away
    (megatron's placement: (W - 1) / W)."""
    w = placement.ep_size
    moved = total = 0.0
    for l, rows_E in enumerate(rows_LE):
        k = [0] * placement.num_experts
        for e in placement.slot_experts(l):
            k[e] += 1
        moved += sum(r * (w - k[e]) / w for e, r in enumerate(rows_E))
        total += sum(rows_E)
    return moved / total if total else (w - 1) / w


def placed_loads(rows_LE: Sequence[Sequence[float]], ep_size: int, setting: str,
                 replicas: int = 0) -> tuple[Loads, Placement]:
    """(loads, placement) of ``setting`` (``balanced`` or a placement file) on an EP group of
    ``ep_size`` ranks, from the rows per logical expert and layer."""
    if setting == BALANCED:
        placement = balanced(rows_LE, ep_size, replicas)
    else:
        placement = Placement.read(setting).validate(num_experts=len(rows_LE[0]), ep_size=ep_size,
                                                     depth=len(rows_LE))
    table = []
    for ranks in rank_rows(placement, rows_LE):
        mean = sum(ranks) / len(ranks)
        table.append([x / mean if mean else 1.0 for x in ranks])
    return (lambda i, l: table[l]), placement
