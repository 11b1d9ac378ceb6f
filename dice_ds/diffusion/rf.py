"""Rectified-flow Euler steps (the XL/G checkpoints; spec §1.4): a step rule for the pipeline's loop.

Owns ``rf_times`` and ``RectifiedFlow``. Training convention: ``z_t = (1 − t)·x0 + t·ε``, the model
predicts ``v = ε − x0`` on its first C channels, t = 1 is noise and t = 0 is data. With S steps the
loop visits i = S, S−1, …, 1 with t = i / S fed raw (no ×1000) and updates ``z ← z − v / S``; the
last update lands on t = 0, which is the returned sample. Any S ≥ 1 is honoured (the reference
hard-codes 50, pitfall 3). Guidance is on all C channels (``guided_channels=None``); no step draws
noise.

Shape legend: N batch, C latent channels, H/W latent side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rf_times(num_steps: int) -> list[tuple[int, float]]:
    """The (i, t) pairs in sampling order: i = S..1, t = i / S."""
    return [(i, i / num_steps) for i in range(num_steps, 0, -1)]


@dataclass(frozen=True)
class RectifiedFlow:
    """The Euler step rule of S steps (``dice_ds.diffusion.StepRule``)."""

    num_steps: int
    name = "rf"
    guided_channels = None
    draws_own_noise = False

    def timesteps(self) -> list[tuple[int, float]]:
        return rf_times(self.num_steps)

    def begin(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def model_input(self, step: int, z: torch.Tensor) -> torch.Tensor:
        return z

    def draws_noise(self, step: int) -> bool:
        return False

    def update(self, step: int, z: torch.Tensor, out: torch.Tensor, noise) -> torch.Tensor:
        """z ← z − v / S with v the model output's first C channels."""
        del step, noise
        return z - (1.0 / self.num_steps) * out[:, :z.shape[1]]
