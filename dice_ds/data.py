"""The digits data set of the shipped small model: loading, upsampling, splits, pixel <-> uint8.

Owns the one definition of the pixel space that the shipped ``digits`` DiT-MoE is trained in and that
``dice-ds eval`` measures in, so training, sampling and evaluation cannot drift apart:

- source: scikit-learn's bundled ``load_digits`` (1797 grayscale 8×8 images, values 0..16, 10
  classes; no download);
- images are upsampled bilinearly to ``DIGITS_SIZE`` = 16 px and mapped to [-1, 1]
  (0 -> -1 = black background, 16 -> +1 = white stroke);
- one fixed train/test split (seeded permutation, ``TEST_FRACTION`` held out); the generative model
  and the classifier train on ``train``; classifier accuracy is reported on ``test``; the FID
  reference is the full set;
- uint8 conversion is the identity "VAE" decode of the sampler, ``clamp(127.5·x + 128, 0, 255)``
  (spec §1.4), replicated to RGB for ``samples.npz``; ``from_uint8`` inverts it (mean over RGB).

Shape legend: N images, C channels (1 here, 3 in RGB arrays), H, W pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dice_ds.vae import to_uint8_nhwc

DIGITS_SIZE = 16
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 8, 8] float in 0..16, labels [N] int64) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def upsample(x_NCHW: torch.Tensor, size: int = DIGITS_SIZE) -> torch.Tensor:
    """Bilinear resize to size×size (no corner alignment)."""
    return F.interpolate(x_NCHW, size=(size, size), mode="bilinear", align_corners=False)


def load_digits_tensors(split: str = "all", size: int = DIGITS_SIZE
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, size, size] in [-1, 1] and labels [N] for split 'train' | 'test' | 'all'."""
    images, labels = _raw_digits()
    x_NCHW = torch.from_numpy(images).unsqueeze(1) / 8.0 - 1.0
    x_NCHW = upsample(x_NCHW, size).clamp(-1.0, 1.0)
    y_N = torch.from_numpy(labels)
    if split == "all":
        return x_NCHW, y_N
    perm = torch.randperm(len(y_N), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(TEST_FRACTION * len(y_N)))
    idx = {"test": perm[:n_test], "train": perm[n_test:]}.get(split)
    if idx is None:
        raise ValueError(f"split={split!r}: use 'train', 'test' or 'all'")
    return x_NCHW[idx], y_N[idx]


def to_uint8(x_NCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] pixels -> uint8 [N, H, W, 3], exactly as ``--vae identity`` writes samples."""
    return to_uint8_nhwc(x_NCHW)


def from_uint8(images_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] (or [N, H, W]) -> grayscale [N, 1, H, W] in about [-1, 1]."""
    arr = np.asarray(images_NHWC)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {arr.shape}")
    x = torch.from_numpy(arr).float().mean(dim=3, keepdim=True)
    return ((x - 128.0) / 127.5).permute(0, 3, 1, 2).contiguous()


def real_digits_uint8(size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All real digits as the sampler would write them: (uint8 [N, H, W, 3], labels [N])."""
    x, y = load_digits_tensors("all", size)
    return to_uint8(x), y.numpy()
