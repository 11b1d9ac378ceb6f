"""The denoising loop: one batch of samples through a step rule, driving the parallel runtime.

Owns ``denoise`` (the only loop over sampling steps in dice_ds), ``LoopPosition`` (where the
loop is: what a rank reports when a collective fails mid-batch), ``FiniteCheck`` and
``NonFiniteOutputError`` (a step whose output holds NaN/inf stops the batch). The step rules say what a step
computes (dice_ds/diffusion: timesteps, noise draws, update); the schedule says what each runtime
does at each step (dice_ds/schedule.py); this loop puts them together:

    x = rule.begin(z)                      # a fresh scheduler state; the initial state
    with runtime.batch(schedule):          # reset at entry; finish, or abort on an exception
        for i, t in rule.timesteps():      # i = S..1 (position in the scheduler's timesteps)
            runtime.begin_step(i)
            out = predict(model, rule.model_input(i, x), t, y, cfg)
            noise = per-sample draws if rule.draws_noise(i)   # (or the generators themselves)
            x = rule.update(i, x, out, noise)
            check(x, out)                   # NaN/inf: stop (or, in an EP/SP group, note it)
            x, stop = on_step_end(k, t, x)  # callbacks, progress; stop: leave the loop

Every sampler runs here: the hand-written rules (dice_ds/diffusion/rf.py, gaussian.py) and any
diffusers scheduler (``dice_ds.diffusion.schedulers.SchedulerRule``), so the runtime's step i and
the schedule come from the rule's timesteps whatever the scheduler. ``on_step_end`` (the
pipeline's step callback and progress bar) may replace the latents and end the batch early: the
runtime's batch then finishes normally (nothing is in flight after a completed step).

Invariant: a batch never leaves exchanges in flight, also when a forward raises
(``dice_ds.lifecycle.BatchLifecycle``), so the next batch on the same runtime starts clean.

Non-finite outputs: after every step the new state is checked (``FiniteCheck``: ``torch.aminmax``,
whose min or max is NaN/inf when any value is: one pass over the batch's latents, 25 us for a
DiT-XL batch of 32 [32, 4, 32, 32] on one CPU thread, 10 us for the debug batch, no collective;
``isfinite(x).all()`` took 10x longer). A rank whose loop exchanges nothing (DP, one rank) stops
at that step. Ranks in an EP or SP group exchange every step, so one of them cannot stop alone
(its peers would wait in an exchange it never joins): the loop runs on to the end of the call's
sub-batches (NaN only spreads to the samples that share its tokens or K/V) and the first
non-finite step is raised then. The call agrees at its end (dice_ds/pipeline/core.py: one
all-reduce of a flag per call), so every rank raises the same line. A per-step all-reduce would
stop the group at the step, but measured 0.2-0.4 ms per step (gloo, 2 ranks, loaded 2-core
machine), +10 % on a debug DICE step, biasing the EP modes' timings against DP's. Only the step
is named, with whether the model's prediction was already non-finite or the update overflowed:
the layer would need a check per layer and step (or a re-run).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from dice_ds.config import ConfigError
from dice_ds.diffusion import StepRule, per_sample_randn, predict


class NonFiniteOutputError(ConfigError):
    """A sampling step produced NaN/inf: the batch stops, nothing of it is returned or written.

    A ``ConfigError`` (one line, exit code 2 in the CLI): what makes a run non-finite is its input
    (weights, dtype, guidance scale, latents), never a transient fault."""


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


class FiniteCheck:
    """Per step: is this rank's new state finite? The first non-finite step is kept in
    ``failure`` (a ``NonFiniteOutputError`` naming it); ``stop``: raise it at once (a loop that
    exchanges nothing with other ranks), else let the loop run on and raise it after the call's
    sub-batches, when every rank agrees (module docstring)."""

    def __init__(self, stop: bool = True):
        self.stop = stop
        self.failure: NonFiniteOutputError | None = None

    def __call__(self, x: torch.Tensor, out: torch.Tensor, position: "LoopPosition",
                 what: str) -> None:
        lo, hi = torch.aminmax(x)  # NaN and inf reach min or max: 10x cheaper than isfinite(x)
        if bool(torch.isfinite(torch.stack((lo, hi))).all()):
            return
        if self.failure is None:
            n = int((~torch.isfinite(x)).sum())
            cause = ("the model's prediction was already non-finite" if not bool(
                torch.isfinite(out).all()) else "the model's prediction was finite, the update "
                "overflowed")
            self.failure = NonFiniteOutputError(
                f"non-finite output at {position.describe()}: {n} of {x.numel()} values of {what} "
                f"are NaN/inf ({cause}); the batch is stopped and nothing of it is written. Check "
                "the weights, the dtype (fp16 overflows: use bf16 or fp32), the guidance scale "
                "and the latents (only the step is named: the check runs on each step's output, "
                "not per layer)")
        if self.stop:
            raise self.failure


@torch.no_grad()
def denoise(rule: StepRule, model, z_NCHW: torch.Tensor, y_N: torch.Tensor,
            cfg_scale: float = 1.0, *, runtime=None, schedule=None, generators=None,
            position: LoopPosition | None = None, check: FiniteCheck | None = None,
            what: str = "the batch's latents", on_step_end=None) -> torch.Tensor:
    """Run ``rule`` from noise ``z`` with labels ``y``; returns fp32 [N, C, H, W].

    ``runtime`` (a ``dice_ds.lifecycle.StepRuntime`` or None) runs the batch under ``schedule``
    (the call's ``dice_ds.schedule.Schedule``, required with a runtime, of the rule's step count).
    ``generators``: one per sample, continuing the stream of its initial noise; required when the
    rule draws noise. ``position`` is updated before every forward. ``check``: the finiteness
    check of every step (default: this rank alone); ``what`` names the batch in its error.
    ``on_step_end(k, t, x) -> (x, stop)``: after step k (0-based, forwards) at model time t; it
    may replace x, and ``stop`` ends the loop.
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
    check = check if check is not None else FiniteCheck()
    position.begin(rule.num_steps)
    x = rule.begin(z_NCHW.float())
    with runtime.batch(schedule) if runtime is not None else nullcontext():
        for k, (i, t) in enumerate(steps):
            t_N = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
            position.at(i)
            if runtime is not None:
                runtime.begin_step(i)
            out = predict(model, rule.model_input(i, x), t_N, y_N, cfg_scale,
                          guided_channels=rule.guided_channels)
            noise = None
            if rule.draws_noise(i):
                noise = generators if rule.draws_own_noise else per_sample_randn(
                    generators, shape, x.device)
            x = rule.update(i, x, out, noise)
            check(x, out, position, what)
            if on_step_end is not None:
                x, stop = on_step_end(k, t, x)
                if stop:
                    break
    return x
