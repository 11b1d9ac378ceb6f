"""The start-up calibration of a balanced expert placement (``--expert-placement balanced``).

Owns ``calibration_rows`` and ``balanced_placement``: one forward of a model built with megatron's
contiguous placement on the job's first sampling step (each rank's first batch of the job:
``--per-proc-batch-size`` samples of seeded noise and labels, ``draw_conditions`` with the global
seed and the rank's sample indices, at the sampler's first timestep, guided as the job is),
counting the rows the router sends to each logical expert in every MoE layer
(``DiTMoELayer.expert_rows_E``); the counts are summed over the world (one all-reduce), so every
rank computes the same placement (``dice_ds.placement.balanced`` with ``--expert-replicas``).
The routing pattern is stable across steps (docs/benchmarks.md), so the first step stands for the
run. The forward runs megatron's own MoE phases on the EP groups (no runtime is attached yet).

Invariant: collective over the world (every rank calls it, in the same order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dice_ds.diffusion import draw_conditions, predict, step_rule
from dice_ds.options import sampler_of, steps_of
from dice_ds.placement import Placement, balanced


@torch.no_grad()
def calibration_rows(model, opts, rank: int, world: int) -> list[list[float]]:
    """Rows per logical expert of every MoE layer in one forward of the job's first step,
    summed over the world (collective)."""
    cfg = model.cfg
    indices = [i * world + rank for i in range(opts.per_proc_batch_size)]
    z, y, _ = draw_conditions(opts.global_seed, indices, cfg.in_channels, cfg.input_size,
                              cfg.num_classes)
    rule = step_rule(sampler_of(opts), steps_of(opts))
    _, t = rule.timesteps()[0]
    device = next(model.parameters()).device
    layers = model.moe_layers()
    for layer in layers:
        layer.expert_rows_E = layer.slot_rows_P = None
    t_N = torch.full((len(indices),), t, dtype=torch.float32, device=device)
    predict(model, z.to(device), t_N, y.to(device), opts.cfg_scale, rule.guided_channels)
    rows = torch.stack([layer.expert_rows_E for layer in layers]).to(torch.float64)
    for layer in layers:
        layer.expert_rows_E = layer.slot_rows_P = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = rows.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(rows)
    return rows.cpu().tolist()


def balanced_placement(model, opts, ep_size: int, rank: int, world: int) -> Placement:
    """The balanced placement of the job's first step's routing (module doc; collective)."""
    rows = calibration_rows(model, opts, rank, world)
    return balanced(rows, ep_size, opts.expert_replicas,
                    source=f"start-up calibration: first step of {opts.per_proc_batch_size} "
                           f"samples per rank on {world} ranks")
