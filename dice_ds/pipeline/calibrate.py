"""The start-up calibration of a balanced expert placement (``--expert-placement balanced``).

Owns ``calibration_rows`` and ``balanced_placement``: a short sampling trajectory of a model built
with megatron's contiguous placement, counting the rows the router sends to each logical expert in
every MoE layer (``DiTMoELayer.expert_rows_E``, summed over the calls) and summing them over the
world (one all-reduce), so every rank computes the same placement (``dice_ds.placement.balanced``
with ``--expert-replicas``).

The trajectory: each rank's first batch of the job (``--per-proc-batch-size`` samples of seeded
noise and labels, ``draw_conditions`` with the global seed and the rank's sample indices, guided
as the job is) denoised in ``CALIBRATION_STEPS`` steps (fewer if the job has fewer) of the job's
sampler through the one loop (``dice_ds.pipeline.denoise``; a noisy sampler runs its deterministic
form, DDIM for DDPM, so nothing draws noise): the model sees states spread over the job's whole
time range, as the run will. One forward at the first timestep is not enough on a trained model:
its routing follows the timestep. Measured on the shipped digits model (4 ranks, 20 RF steps,
docs/benchmarks.md "Balanced placement on trained routing"): the first step's rows put the busiest
rank at 1.44x the mean over the run (median layer) where megatron's contiguous placement gives
1.11x. The random-weight bench model routes alike at every step, so there one step was enough.
The forwards run megatron's own MoE phases on the EP groups (no runtime is attached yet).

Invariant: collective over the world (every rank calls it, in the same order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dice_ds.diffusion import draw_conditions, step_rule
from dice_ds.options import sampler_of, steps_of
from dice_ds.pipeline.denoise import denoise
from dice_ds.placement import Placement, balanced

CALIBRATION_STEPS = 4
"""Forwards of the calibration trajectory (module docstring)."""


def calibration_rule(opts):
    """The step rule the calibration runs: the job's sampler without noise draws (DDPM as DDIM),
    ``CALIBRATION_STEPS`` steps or the job's fewer."""
    sampler = sampler_of(opts)
    return step_rule("ddim" if sampler == "ddpm" else sampler,
                     min(CALIBRATION_STEPS, steps_of(opts)))


@torch.no_grad()
def calibration_rows(model, opts, rank: int, world: int) -> list[list[float]]:
    """Rows per logical expert of every MoE layer over the calibration trajectory, summed over the
    world (collective)."""
    cfg = model.cfg
    indices = [i * world + rank for i in range(opts.per_proc_batch_size)]
    z, y, _ = draw_conditions(opts.global_seed, indices, cfg.in_channels, cfg.input_size,
                              cfg.num_classes)
    rule = calibration_rule(opts)
    device = next(model.parameters()).device
    layers = model.moe_layers()
    for layer in layers:
        layer.expert_rows_E = layer.slot_rows_P = None
    denoise(rule, model, z.to(device), y.to(device), opts.cfg_scale,
            what="the expert-placement calibration's latents")
    rows = torch.stack([layer.expert_rows_E for layer in layers]).to(torch.float64)
    for layer in layers:
        layer.expert_rows_E = layer.slot_rows_P = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = rows.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(rows)
    return rows.cpu().tolist()


def balanced_placement(model, opts, ep_size: int, rank: int, world: int) -> Placement:
    """The balanced placement of the job's routing over the calibration trajectory (module doc;
    collective)."""
    rows = calibration_rows(model, opts, rank, world)
    rule = calibration_rule(opts)
    return balanced(rows, ep_size, opts.expert_replicas,
                    source=f"start-up calibration: {rule.num_steps} {rule.name} steps of "
                           f"{opts.per_proc_batch_size} samples per rank on {world} ranks")
