"""Samplers for DiT-MoE as step rules, and the per-sample random draws that feed them.

Owns: the initial conditions of a sample (noise and class label) as a pure function of
(global seed, global sample index), the ``StepRule`` protocol and ``step_rule`` (a sampler name and
a step count -> its rule), and the shared model-call helper of the loop (``predict``: one merged
classifier-free-guidance forward, or a plain forward at scale 1). The denoising loop that runs a
rule (and drives the parallel runtime) is the pipeline's: dice_ds/pipeline/denoise.py.

Invariants:
- Sample ``index`` draws its label, its initial noise and (DDPM) every later noise tensor from its own
  ``torch.Generator`` seeded with ``sample_seed(global_seed, index)``. Which rank or which batch holds
  the sample therefore never changes what it receives, so a W-rank run and a 1-rank run with the same
  global seed produce the same image for every index (spec §2.1; DiT's rank-seeded batches do not).
- A step rule is a pure description: its steps i (counting down S..1) with the timestep fed to
  the model, which steps draw one noise tensor per sample (``draws_noise``; the loop draws it from
  the sample's generator), and the update x <- f(i, x, model output, noise). Rules never see a
  runtime; the loop passes i to ``runtime.begin_step(i)`` before every model call (pitfall 6).

Rules: ``rf.RectifiedFlow`` (rectified flow, Euler), ``gaussian.Gaussian`` (DDPM, and DDIM with
eta 0); ``step_rule(name, S)`` maps the CLI name to the rule. ``schedulers`` (imported only where
a diffusers scheduler is used: it loads diffusers) wraps the rules as diffusers scheduler objects
and any diffusers scheduler as a rule.

Shape legend: N batch, C latent channels, H/W latent side.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dice_ds.diffusion.gaussian import Gaussian
from dice_ds.diffusion.rf import RectifiedFlow

_SEED_STRIDE = 0x9E3779B1  # odd, so index -> seed is a bijection mod 2^32 for every global seed


def sample_seed(global_seed: int, index: int) -> int:
    """Seed of sample ``index``'s generator: ``(index + global_seed · 0x9E3779B1) mod 2^32``.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the seed is built in
    32 bits: within one global seed, distinct indices always get distinct seeds.
    """
    return (int(index) + int(global_seed) * _SEED_STRIDE) % 2**32


def sample_generators(global_seed: int, indices: list[int]) -> list[torch.Generator]:
    """One fresh CPU generator per sample index, seeded with ``sample_seed(global_seed, index)``."""
    return [torch.Generator().manual_seed(sample_seed(global_seed, index)) for index in indices]


def draw_from(generators: list[torch.Generator], channels: int, side: int, num_classes: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each generator's label (``randint(num_classes)``) then its noise [C, side, side], stacked:
    (z [N, C, side, side], y [N] int64). The generators continue from there (DDPM noise)."""
    ys, zs = [], []
    for g in generators:
        ys.append(torch.randint(num_classes, (1,), generator=g))
        zs.append(torch.randn(channels, side, side, generator=g))
    return torch.stack(zs), torch.cat(ys)


def draw_conditions(global_seed: int, indices: list[int], channels: int, side: int,
                    num_classes: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
    """Initial noise z [N, C, side, side], labels y [N] (int64) and each sample's generator.

    Per sample, the generator first draws the label (``randint(num_classes)``), then the noise; the
    generator is returned so that a stochastic sampler continues the same stream.
    """
    gens = sample_generators(global_seed, indices)
    z, y = draw_from(gens, channels, side, num_classes)
    return z, y, gens


def labels_for(global_seed: int, indices: list[int], num_classes: int) -> list[int]:
    """The class labels of ``indices`` (the first draw of each sample's generator)."""
    out = []
    for index in indices:
        g = torch.Generator().manual_seed(sample_seed(global_seed, index))
        out.append(int(torch.randint(num_classes, (1,), generator=g)))
    return out


def per_sample_randn(generators: list[torch.Generator], shape: tuple[int, ...],
                     device: torch.device | str) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked to [N, *shape] on ``device``.

    Drawn on the CPU so that the stream is the same on every device.
    """
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def predict(model, z_NCHW: torch.Tensor, t_N: torch.Tensor, y_N: torch.Tensor, cfg_scale: float,
            guided_channels: int | None = None) -> torch.Tensor:
    """The model's output [N, C_out, H, W] in fp32, guided when ``cfg_scale != 1``.

    ``cfg_scale == 1`` runs a plain conditional forward on N samples instead of the doubled batch:
    guidance at scale 1 is the conditional prediction, so only float rounding differs (and the
    unconditional half is never computed).
    """
    x = z_NCHW.to(model_dtype(model))
    if cfg_scale == 1.0:
        out = model(x, t_N, y_N)
    else:
        out = model.forward_with_cfg(x, t_N, y_N, cfg_scale, guided_channels)
    return out.float()


class StepRule(Protocol):
    """One sampler's denoising steps for a step count (``step_rule``)."""

    num_steps: int
    name: str
    guided_channels: int | None
    """Channels guidance applies to (None: all)."""
    draws_own_noise: bool
    """True: a noisy step's update gets the samples' generators (it draws itself, as a diffusers
    scheduler does), not a drawn tensor."""

    def timesteps(self) -> list[tuple[int, float]]:
        """(i, timestep fed to the model) in sampling order, i = S..1."""

    def begin(self, z: torch.Tensor) -> torch.Tensor:
        """A batch starts from noise z: reset any per-batch state; the initial state."""

    def model_input(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """What the model is fed at step i (diffusers' ``scale_model_input``)."""

    def draws_noise(self, step: int) -> bool:
        """Whether step i's update takes one standard-normal draw per sample."""

    def update(self, step: int, x: torch.Tensor, out: torch.Tensor, noise) -> torch.Tensor:
        """x after step i, from the model output (fp32) and the step's noise (or None)."""


SAMPLER_NAMES = ("rf", "ddpm", "ddim")


def step_rule(name: str, num_steps: int) -> StepRule:
    """The step rule of CLI sampler ``name`` ('rf', 'ddpm' or 'ddim') for ``num_steps`` steps."""
    if name == "rf":
        return RectifiedFlow(num_steps)
    if name in ("ddpm", "ddim"):
        return Gaussian(num_steps, stochastic=name == "ddpm")
    raise ValueError(f"sampler={name!r}: use one of {SAMPLER_NAMES}")


def noise_draws(rule: StepRule) -> int:
    """How many noise tensors per sample the rule's steps draw (after the initial noise)."""
    return sum(rule.draws_noise(i) for i, _ in rule.timesteps())
