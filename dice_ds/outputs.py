"""The sample directory: where every rank writes its samples and rank 0 assembles the results.

Owns the global sample index, the per-file atomic writes and the end-of-run assembly.

Layout of a sample directory::

    samples/{index:06d}.png   one image per global sample index (uint8 RGB)
    latents/{index:06d}.npy   with --vae none: the fp32 latent [C, H, W] instead
    samples.npz               arr_0: uint8 [N, H, W, 3] in index order (ADM-evaluator format),
                              labels: int64 [N] class labels
    latents.npz               with --vae none: arr_0 fp32 [N, C, H, W], labels
    grid.png                  the first (up to) 64 images
    run.json                  run description and measurements (written by rank 0)

Index formula (the reference's ``i·W + rank + total``): in batch b, local position i of rank r holds
global index ``b·(n·W) + i·W + r`` (n per-rank batch size, W world size). Batch b thus covers the
indices [b·n·W, (b+1)·n·W) across ranks; indices >= the requested sample count are computed (every
rank runs the same number of batches) but not written.

Invariants: every file is written to a temporary name and renamed into place, so a file that exists
is complete; a batch whose files all exist is done, and a re-run skips it. Assembly reads files in
index order, so the result does not depend on the world size.
"""

from __future__ import annotations

import json
import math
import os
import zipfile

import numpy as np


def sample_index(batch: int, local_i: int, rank: int, world_size: int, per_proc: int) -> int:
    """Global index of local sample ``local_i`` of ``rank`` in ``batch``."""
    return batch * per_proc * world_size + local_i * world_size + rank


def batch_indices(batch: int, rank: int, world_size: int, per_proc: int) -> list[int]:
    return [sample_index(batch, i, rank, world_size, per_proc) for i in range(per_proc)]


def num_batches(num_samples: int, world_size: int, per_proc: int) -> int:
    """Batches per rank: the sample count rounded up to a multiple of n·W."""
    return math.ceil(num_samples / (per_proc * world_size))


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


class SampleDir:
    """One run's output directory (see the module docstring)."""

    def __init__(self, path: str, latents_only: bool = False):
        self.path = path
        self.latents_only = latents_only
        self.item_dir = os.path.join(path, "latents" if latents_only else "samples")

    def create(self) -> "SampleDir":
        os.makedirs(self.item_dir, exist_ok=True)
        return self

    def item_path(self, index: int) -> str:
        ext = "npy" if self.latents_only else "png"
        return os.path.join(self.item_dir, f"{index:06d}.{ext}")

    def has_all(self, indices) -> bool:
        return all(os.path.isfile(self.item_path(i)) for i in indices)

    def write_images(self, indices: list[int], images_NHWC: np.ndarray) -> None:
        from PIL import Image

        for index, img in zip(indices, images_NHWC):
            _atomic_write(self.item_path(index),
                          lambda fh, img=img: Image.fromarray(img).save(fh, format="PNG"))

    def write_latents(self, indices: list[int], latents_NCHW: np.ndarray) -> None:
        for index, lat in zip(indices, latents_NCHW):
            _atomic_write(self.item_path(index), lambda fh, lat=lat: np.save(fh, lat))

    def read_item(self, index: int) -> np.ndarray:
        if self.latents_only:
            return np.load(self.item_path(index))
        from PIL import Image

        with Image.open(self.item_path(index)) as im:
            return np.asarray(im.convert("RGB"))

    def assemble(self, indices: list[int], labels: list[int]) -> str:
        """Write ``samples.npz`` / ``latents.npz`` from the files of ``indices``, in that order.

        Streams one item at a time into the archive (50k 256px images are ~10 GB).
        """
        name = "latents.npz" if self.latents_only else "samples.npz"
        first = self.read_item(indices[0])
        header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                  "shape": (len(indices), *first.shape)}

        def write(fh):
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_2_0(out, header)
                    for index in indices:
                        item = self.read_item(index)
                        if item.shape != first.shape or item.dtype != first.dtype:
                            raise ValueError(f"{self.item_path(index)}: shape {item.shape} "
                                             f"differs from {first.shape}")
                        out.write(np.ascontiguousarray(item).tobytes())
                with zf.open("labels.npy", "w") as out:
                    np.save(out, np.asarray(labels, dtype=np.int64))

        path = os.path.join(self.path, name)
        _atomic_write(path, write)
        return path

    def write_grid(self, indices: list[int], max_images: int = 64, pad: int = 2) -> str | None:
        """A grid of the first ``max_images`` images (``grid.png``); None for latents-only runs."""
        if self.latents_only:
            return None
        from PIL import Image

        shown = [i for i in indices if os.path.isfile(self.item_path(i))][:max_images]
        if not shown:
            return None
        images = [self.read_item(i) for i in shown]
        h, w = images[0].shape[:2]
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
        grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
        for k, img in enumerate(images):
            r, c = divmod(k, cols)
            grid[pad + r * (h + pad):pad + r * (h + pad) + h,
                 pad + c * (w + pad):pad + c * (w + pad) + w] = img
        path = os.path.join(self.path, "grid.png")
        _atomic_write(path, lambda fh: Image.fromarray(grid).save(fh, format="PNG"))
        return path

    def write_run_json(self, info: dict) -> str:
        path = os.path.join(self.path, "run.json")
        text = json.dumps(info, indent=2, sort_keys=True, default=str) + "\n"
        _atomic_write(path, lambda fh: fh.write(text.encode()))
        return path
