"""A pipeline call's results: the output dataclass, the output types, delivery to the output
ranks and the exchange totals (the same arithmetic as run.json's).

Owns ``DiTMoEPipelineOutput``, ``encode`` (a rank's sampled latents -> the array it sends, on the
rank that sampled them: decoding is spread over the ranks), ``finish`` (arrays -> the requested
output type), ``deliver`` (gather to rank 0 / every rank / none) and ``exchange_totals``.

Output types: ``latent``: the sampler's output, fp32 tensor [B, C, h, w] (for the pixel-space
digits model the image in [-1, 1]); ``pt``: decoded images as a fp32 tensor [B, C, H, W] in [0, 1]
(diffusers' ``(x / 2 + 0.5).clamp(0, 1)``; C = the decoder's channels, 1 for digits); ``np``: the
same as a numpy array [B, H, W, C]; ``pil``: a list of RGB ``PIL.Image`` whose pixels are the
bytes ``dice-ds sample`` writes (``dice_ds.vae.to_uint8_nhwc``: clamp(127.5·x + 128) truncated,
grayscale repeated to RGB).

A decoded image that holds NaN/inf (an SD VAE overflowing in fp16 on finite latents) raises
``NonFiniteOutputError`` in ``encode``, before anything is sent or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dice_ds.pipeline.denoise import NonFiniteOutputError
from dice_ds.vae import to_uint8_nhwc


@dataclass
class DiTMoEPipelineOutput:
    """What ``DiTMoEPipeline.__call__`` returns (diffusers' ``ImagePipelineOutput`` plus two fields).

    ``images``: the output type's images in position order, or None on a rank that receives none
    (``output_ranks``); ``indices``: the call's positions of ``images`` (``range(B)``, or with
    ``output_ranks='local'`` this rank's own positions j % W == rank); ``stats``: the call's
    measurements (``DiTMoEPipeline.__call__`` lists them)."""

    images: list | np.ndarray | torch.Tensor | None
    stats: dict = field(default_factory=dict)
    indices: list[int] | None = None


def encode(x_NCHW: torch.Tensor, output_type: str, decoder) -> np.ndarray:
    """What a rank sends for its sampled latents: uint8 NHWC (pil) or fp32 NCHW (the others)."""
    if output_type == "latent":
        return x_NCHW.detach().to("cpu", torch.float32).numpy()
    image = decoder.decode_float(x_NCHW)  # decode() is to_uint8_nhwc(decode_float()): same bytes
    if not bool(torch.isfinite(image).all()):
        n = int((~torch.isfinite(image)).sum())
        raise NonFiniteOutputError(f"non-finite output of the decoder: {n} of {image.numel()} "
                                   "values are NaN/inf on finite latents; nothing of the batch is "
                                   "written. Run the VAE in fp32 (fp16 overflows)")
    if output_type == "pil":
        return to_uint8_nhwc(image)
    return (image / 2 + 0.5).clamp(0, 1).cpu().numpy()


def finish(arrays: list[np.ndarray], output_type: str):
    """Rows (in position order) as the output type; an empty list/array for no rows."""
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(a) for a in arrays]
    if not arrays:
        return np.zeros((0,), np.float32) if output_type == "np" else torch.zeros(0)
    stacked = np.stack(arrays)
    if output_type == "np":
        return np.ascontiguousarray(stacked.transpose(0, 2, 3, 1))
    return torch.from_numpy(stacked)


def deliver(positions: list[int], rows: np.ndarray | None, output_ranks: str, rank: int,
            world: int, batch_size: int):
    """(rows in position order, their positions) on the ranks that receive images, else None.

    Collective for ``rank0`` (gather to rank 0) and ``all`` (all-gather) when ``world > 1``."""
    mine = [] if rows is None else list(rows)
    if output_ranks == "local" or world == 1:
        return mine, positions
    import torch.distributed as dist

    if output_ranks == "all":
        parts: list = [None] * world
        dist.all_gather_object(parts, (positions, mine))
    else:
        parts = [None] * world if rank == 0 else None
        dist.gather_object((positions, mine), parts, dst=0)
        if rank != 0:
            return None
    by_position = {j: row for pos, rws in parts for j, row in zip(pos, rws)}
    order = list(range(batch_size))
    return [by_position[j] for j in order], order


def rank_exchange(stats: dict | None) -> tuple[int, int]:
    """(bytes that left this rank in EP all-to-alls and SP all-gathers, its largest stale cache:
    EP outputs + displaced-SP K/V buffers) from its ``runtime.stats()``."""
    s = stats or {}
    sent = (s.get("a2a_bytes_sent_remote", s.get("a2a_bytes_sent", 0)) or 0) \
        + (s.get("sp_bytes_exchanged") or 0)
    return sent, (s.get("ep_cache_peak_bytes") or 0) + (s.get("sp_kv_buffer_bytes") or 0)


def exchange_totals(per_rank: list[tuple[int, int]]) -> dict:
    """run.json's ``bytes_exchanged`` (sum over ranks) and ``cache_peak_bytes`` (max)."""
    return {"bytes_exchanged": sum(b for b, _ in per_rank),
            "cache_peak_bytes": max((c for _, c in per_rank), default=0)}
