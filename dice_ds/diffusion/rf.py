"""Rectified-flow Euler sampler (the XL/G checkpoints; spec §1.4).

Owns ``rf_times`` and ``sample_rf``. Training convention: ``z_t = (1 − t)·x0 + t·ε``, the model predicts
``v = ε − x0`` on its first C channels, t = 1 is noise and t = 0 is data. With S steps the sampler
visits i = S, S−1, …, 1 with t = i / S fed raw (no ×1000) and updates ``z ← z − v / S``; the last update
lands on t = 0, which is the returned sample. Any S ≥ 1 is honoured (the reference hard-codes 50,
pitfall 3). Guidance is on all C channels (``guided_channels=None``).

Shape legend: N batch, C latent channels, H/W latent side.
"""

from __future__ import annotations

import torch

from dice_ds.diffusion import begin_step, predict


def rf_times(num_steps: int) -> list[tuple[int, float]]:
    """The (i, t) pairs in sampling order: i = S..1, t = i / S."""
    return [(i, i / num_steps) for i in range(num_steps, 0, -1)]


@torch.no_grad()
def sample_rf(model, z_NCHW: torch.Tensor, y_N: torch.Tensor, num_steps: int,
              cfg_scale: float = 1.0, runtime=None, generators=None) -> torch.Tensor:
    """Integrate the flow from noise ``z`` (t = 1) to data (t = 0); returns fp32 [N, C, H, W].

    ``runtime`` (an EP runtime or None): ``reset()`` first, ``begin_step(i, S)`` before every model
    call, ``finish()`` at the end. ``generators`` is unused (the sampler is deterministic).
    """
    del generators
    if runtime is not None:
        runtime.reset()
    c = z_NCHW.shape[1]
    z = z_NCHW.float()
    dt = 1.0 / num_steps
    for i, t in rf_times(num_steps):
        t_N = torch.full((z.shape[0],), t, dtype=torch.float32, device=z.device)
        begin_step(runtime, i, num_steps)
        v = predict(model, z, t_N, y_N, cfg_scale)[:, :c]
        z = z - dt * v
    if runtime is not None:
        runtime.finish()
    return z
