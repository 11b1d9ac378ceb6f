"""Gaussian diffusion step rules for the S/B checkpoints: DDPM and DDIM (eta 0) (spec §1.4).

Owns the noise schedule (``spaced_schedule``), one reverse step of each sampler and the step rules
``Gaussian`` (``DDPM``, ``DDIM``) that the pipeline's loop (dice_ds/pipeline/denoise.py) runs.

Schedule: linear betas from 1e-4 to 0.02 over 1000 training steps, in float64. Respacing to S steps
keeps the training timesteps ``round(k · 999 / (S − 1))`` for k = 0..S−1 (Python's round, the
improved-diffusion "S" section rule that DiT's ``create_diffusion(str(S))`` uses) and recomputes betas
from the kept ``alphas_cumprod``. The model is fed the *training* timestep (an integer, as float).

Model output [N, 2C, H, W]: channels [0, C) predict ε, channels [C, 2C) the learned-range variance
``v ∈ [−1, 1]``: ``log σ² = (v+1)/2 · log β_k + (1 − (v+1)/2) · log β̃_k`` (β̃ the clipped posterior
variance). ``x0`` is not clipped (DiT samples with ``clip_denoised=False``). Guidance applies to the
first 3 channels only (DiT's legacy ``forward_with_cfg``; kept for parity with the released S/B
results); the other channels, ε's 4th and the variance, are the conditional branch's.
Both branches are evaluated on the conditional state, exactly as in DiT: its ``forward_with_cfg``
feeds only the first half of the doubled batch to the model (``half = x[: len(x) // 2]``, then
``torch.cat([half, half])``), so the second half it carries is updated but never read, and discarded
at the end. dice_ds runs the same merged forward on [z; z] without carrying that unused half.

Respaced index k is step i = k + 1, counting down S..1 as for the RF rule, so the loop's
``runtime.begin_step(i)`` drives selective-sync schedules alike for every sampler (pitfall 6).
DDPM declares one noise draw per sample on every step but the last (k > 0; ``draws_noise``): the
loop draws it from the sample's generator, continuing the stream of its initial noise.

Shape legend: N batch, C latent channels, H/W latent side.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

TRAIN_STEPS = 1000
GUIDED_CHANNELS = 3


def spaced_timesteps(num_steps: int, train_steps: int = TRAIN_STEPS) -> list[int]:
    """The kept training timesteps, ascending (``round(k · (T−1)/(S−1))``; S = 1 keeps [0])."""
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"num_steps={num_steps} must be in [1, {train_steps}]")
    stride = (train_steps - 1) / (num_steps - 1) if num_steps > 1 else 1.0
    kept, pos = [], 0.0
    for _ in range(num_steps):
        kept.append(round(pos))
        pos += stride
    return kept


@dataclass(frozen=True)
class Schedule:
    """A respaced linear-beta schedule; every array is float64 of length S, indexed by k."""

    timesteps: torch.Tensor
    """Training timestep fed to the model at respaced index k (int64)."""
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def spaced_schedule(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                    train_steps: int = TRAIN_STEPS) -> Schedule:
    """The DDPM/DDIM schedule respaced to ``num_steps`` (see the module docstring)."""
    train_betas = torch.linspace(beta_start, beta_end, train_steps, dtype=torch.float64)
    train_acp = torch.cumprod(1.0 - train_betas, dim=0)
    kept = spaced_timesteps(num_steps, train_steps)
    acp = train_acp[kept]
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    betas = 1.0 - acp / acp_prev
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    # post_var[0] is 0; like improved-diffusion, its log is clipped to the value at k = 1
    first = post_var[1:2] if num_steps > 1 else betas[:1]
    post_log_var = torch.log(torch.cat([first, post_var[1:]]))
    return Schedule(
        timesteps=torch.tensor(kept, dtype=torch.int64),
        betas=betas,
        alphas_cumprod=acp,
        alphas_cumprod_prev=acp_prev,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * acp_prev.sqrt() / (1.0 - acp),
        posterior_mean_coef2=(1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp),
        sqrt_recip_alphas_cumprod=(1.0 / acp).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / acp - 1.0).sqrt(),
    )


def _at(arr: torch.Tensor, k: int) -> float:
    """Entry k of a float64 schedule array as the fp32 scalar the step computes with."""
    return float(arr[k].float())


def predict_x0(sched: Schedule, k: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 = x / √ᾱ_k − √(1/ᾱ_k − 1)·ε."""
    return _at(sched.sqrt_recip_alphas_cumprod, k) * x - _at(sched.sqrt_recipm1_alphas_cumprod, k) * eps


def ddpm_mean_logvar(sched: Schedule, k: int, x: torch.Tensor, out: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and learned-range log variance of x_{k−1} given x_k and the model output."""
    c = x.shape[1]
    eps, v = out[:, :c], out[:, c:2 * c]
    x0 = predict_x0(sched, k, x, eps)
    mean = _at(sched.posterior_mean_coef1, k) * x0 + _at(sched.posterior_mean_coef2, k) * x
    frac = (v + 1.0) / 2.0
    min_log = _at(sched.posterior_log_variance_clipped, k)
    max_log = _at(sched.betas.log(), k)
    return mean, frac * max_log + (1.0 - frac) * min_log


def ddpm_step(sched: Schedule, k: int, x: torch.Tensor, out: torch.Tensor,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One ancestral step x_k -> x_{k−1}; no noise is added at k = 0."""
    mean, log_var = ddpm_mean_logvar(sched, k, x, out)
    if k == 0:
        return mean
    return mean + torch.exp(0.5 * log_var) * noise


def ddim_step(sched: Schedule, k: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta 0): x_{k−1} = √ᾱ_prev·x0 + √(1 − ᾱ_prev)·ε."""
    eps = out[:, :x.shape[1]]
    x0 = predict_x0(sched, k, x, eps)
    acp_prev = _at(sched.alphas_cumprod_prev, k)
    return acp_prev ** 0.5 * x0 + (1.0 - acp_prev) ** 0.5 * eps


@dataclass(frozen=True)
class Gaussian:
    """A step rule of S respaced steps (``dice_ds.diffusion.StepRule``): ancestral DDPM, or
    deterministic DDIM (eta 0) with ``stochastic=False``."""

    num_steps: int
    stochastic: bool = True
    guided_channels = GUIDED_CHANNELS
    draws_own_noise = False

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def model_input(self, step: int, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def name(self) -> str:
        return "ddpm" if self.stochastic else "ddim"

    @cached_property
    def spaced(self) -> Schedule:
        return spaced_schedule(self.num_steps)

    def timesteps(self) -> list[tuple[int, float]]:
        """(i, training timestep) for i = S..1 (respaced index k = i - 1)."""
        kept = self.spaced.timesteps
        return [(k + 1, float(kept[k])) for k in range(self.num_steps - 1, -1, -1)]

    def draws_noise(self, step: int) -> bool:
        """DDPM adds noise on every step but the last (k = 0); DDIM never."""
        return self.stochastic and step > 1

    def update(self, step: int, x: torch.Tensor, out: torch.Tensor, noise) -> torch.Tensor:
        if self.stochastic:
            return ddpm_step(self.spaced, step - 1, x, out, noise)
        return ddim_step(self.spaced, step - 1, x, out)
