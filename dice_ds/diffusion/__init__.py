"""Samplers for DiT-MoE and the per-sample random draws that feed them.

Owns: the initial conditions of a sample (noise and class label) as a pure function of
(global seed, global sample index), and the shared model-call helper used by every sampler
(``predict``: one merged classifier-free-guidance forward, or a plain forward at scale 1).

Invariants:
- Sample ``index`` draws its label, its initial noise and (DDPM) every later noise tensor from its own
  ``torch.Generator`` seeded with ``sample_seed(global_seed, index)``. Which rank or which batch holds
  the sample therefore never changes what it receives, so a W-rank run and a 1-rank run with the same
  global seed produce the same image for every index (spec §2.1; DiT's rank-seeded batches do not).
- Samplers never count steps inside a forward: they pass the step index i (counting down S..1) to the
  EP runtime with ``runtime.begin_step(i, S)`` before every model call (spec pitfall 6).

Samplers: ``rf.sample_rf`` (rectified flow, Euler), ``gaussian.sample_ddpm`` and
``gaussian.sample_ddim`` (eta 0). ``SAMPLERS`` maps the CLI name to the function.

Shape legend: N batch, C latent channels, H/W latent side.
"""

from __future__ import annotations

import torch

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


def begin_step(runtime, i: int, num_steps: int) -> None:
    if runtime is not None:
        runtime.begin_step(i, num_steps)


def _samplers():
    from dice_ds.diffusion.gaussian import sample_ddim, sample_ddpm
    from dice_ds.diffusion.rf import sample_rf

    return {"rf": sample_rf, "ddpm": sample_ddpm, "ddim": sample_ddim}


def get_sampler(name: str):
    """The sampler function for a CLI name: 'rf', 'ddpm' or 'ddim'."""
    return _samplers()[name]

