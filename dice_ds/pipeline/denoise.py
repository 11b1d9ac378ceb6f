"""The denoising loop: one batch of samples through a step rule, driving the parallel runtime.

Owns ``denoise`` (the only loop over sampling steps in dice_ds) and ``LoopPosition`` (where the
loop is: what a rank reports when a collective fails mid-batch). The step rules say what a step
computes (dice_ds/diffusion: timesteps, noise draws, update); the schedule says what each runtime
does at each step (dice_ds/schedule.py); this loop puts them together:

    with runtime.batch(schedule):          # reset at entry; finish, or abort on an exception
        for i, t in rule.timesteps():      # i = S..1
            runtime.begin_step(i)
            out = predict(model, x, t, y, cfg)
            noise = per-sample draws if rule.draws_noise(i)
            x = rule.update(i, x, out, noise)

Invariant: a batch never leaves exchanges in flight, also when a forward raises
(``dice_ds.lifecycle.BatchLifecycle``), so the next batch on the same runtime starts clean.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from dice_ds.diffusion import StepRule, per_sample_randn, predict


@dataclass
class LoopPosition:
    """The step the loop is in (``step`` counts down S..1; None before the first forward) and
    when it started (``time.monotonic``)."""

    step: int | None = None
    num_steps: int = 0
    started: float = field(default_factory=time.monotonic)

    def begin(self, num_steps: int) -> None:
        self.step, self.num_steps, self.started = None, num_steps, time.monotonic()

    def at(self, step: int) -> None:
        self.step, self.started = step, time.monotonic()

    def describe(self) -> str:
        """'step k/S' counting forwards (k = S - i + 1), or 'before step 1'."""
        if self.step is None:
            return "before step 1"
        return f"step {self.num_steps - self.step + 1}/{self.num_steps}"


@torch.no_grad()
def denoise(rule: StepRule, model, z_NCHW: torch.Tensor, y_N: torch.Tensor,
            cfg_scale: float = 1.0, *, runtime=None, schedule=None, generators=None,
            position: LoopPosition | None = None) -> torch.Tensor:
    """Run ``rule`` from noise ``z`` with labels ``y``; returns fp32 [N, C, H, W].

    ``runtime`` (a ``dice_ds.lifecycle.StepRuntime`` or None) runs the batch under ``schedule``
    (the call's ``dice_ds.schedule.Schedule``, required with a runtime, of the rule's step count).
    ``generators``: one per sample, continuing the stream of its initial noise; required when the
    rule draws noise. ``position`` is updated before every forward.
    """
    shape = tuple(z_NCHW.shape[1:])
    steps = rule.timesteps()
    if any(rule.draws_noise(i) for i, _ in steps) and (
            generators is None or len(generators) != z_NCHW.shape[0]):
        raise ValueError(f"the {rule.name} sampler draws noise: pass one torch.Generator per "
                         "sample")
    if runtime is not None and (schedule is None or schedule.num_steps != rule.num_steps):
        raise ValueError(f"denoise: a runtime needs the call's schedule of {rule.num_steps} steps "
                         f"(got {None if schedule is None else schedule.num_steps})")
    position = position if position is not None else LoopPosition()
    position.begin(rule.num_steps)
    x = z_NCHW.float()
    with runtime.batch(schedule) if runtime is not None else nullcontext():
        for i, t in steps:
            t_N = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
            position.at(i)
            if runtime is not None:
                runtime.begin_step(i)
            out = predict(model, x, t_N, y_N, cfg_scale, guided_channels=rule.guided_channels)
            noise = per_sample_randn(generators, shape, x.device) if rule.draws_noise(i) else None
            x = rule.update(i, x, out, noise)
    return x
