"""Offline quality metrics of the shipped digits model: digits-FID, class accuracy, PSNR/MSE vs a reference.

Owns the metric math and the loading of sample sets:

- ``frechet_distance``: ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) on Gaussian statistics (float64; a small
  diagonal offset is added only when the matrix square root is not finite);
- ``digits_fid``: that distance in the 64-d feature space of the shipped classifier, between a sample
  set and the real digits (all 1797, passed through the same uint8 quantisation as samples);
- ``class_accuracy``: fraction of class-conditional samples the classifier assigns to their label;
- ``psnr_mse``: deviation of final samples from a reference run of the same seeds, on uint8 pixels
  scaled to [0, 1], from the global MSE (identical sets -> MSE 0, PSNR +inf);
- ``load_sample_set``: a ``samples.npz`` (``arr_0`` uint8 N×H×W×3, labels in ``labels`` when the
  sampler saved them) or a sample directory (its ``samples.npz``, else its ``samples/*.png``;
  labels from ``labels.npy`` or the npz).

FID from a few hundred samples is biased upwards (it falls with N); compare runs only at equal N.
Shape legend: N images, F features, H/W pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dice_ds.data import from_uint8, real_digits_uint8
from dice_ds.eval.classifier import classify


@dataclass(frozen=True)
class SampleSet:
    """uint8 images [N, H, W, 3] with optional class labels [N]."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.images)


def gaussian_stats(features_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] in float64."""
    f = np.asarray(features_NF, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, F], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    import warnings

    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    with warnings.catch_warnings():  # singular products (dead ReLU features) are handled below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def class_accuracy(pred_N, labels_N) -> float:
    pred, labels = np.asarray(pred_N), np.asarray(labels_N)
    if pred.shape != labels.shape or pred.size == 0:
        raise ValueError(f"predictions {pred.shape} and labels {labels.shape} must match, non-empty")
    return float((pred == labels).mean())


def psnr_mse(images_a: np.ndarray, images_b: np.ndarray) -> dict[str, float]:
    """MSE and PSNR (dB) between two uint8 image sets of equal shape, pixels scaled to [0, 1]."""
    a, b = np.asarray(images_a), np.asarray(images_b)
    if a.shape != b.shape:
        raise ValueError(f"sample sets differ in shape: {a.shape} vs {b.shape} (same seeds and "
                         f"--num-fid-samples are needed for a deviation)")
    mse = float(np.mean((a.astype(np.float64) / 255.0 - b.astype(np.float64) / 255.0) ** 2))
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    return {"mse": mse, "psnr_db": psnr}


# ----------------------------------------------------------------------------- loading
def _labels_from(npz, path: Path) -> np.ndarray | None:
    for key in ("labels", "y", "arr_1"):
        if key in npz.files:
            return np.asarray(npz[key]).astype(np.int64)
    side = path.parent / "labels.npy"
    return np.load(side).astype(np.int64) if side.is_file() else None


def _load_npz(path: Path) -> SampleSet:
    with np.load(path) as npz:
        if "arr_0" not in npz.files:
            raise ValueError(f"{path}: no 'arr_0' array (expected uint8 images N×H×W×3)")
        return SampleSet(np.asarray(npz["arr_0"]), _labels_from(npz, path), str(path))


def _load_png_dir(path: Path) -> SampleSet:
    from PIL import Image

    pngs = sorted((path / "samples").glob("*.png")) or sorted(path.glob("[0-9]*.png"))
    if not pngs:
        raise FileNotFoundError(f"{path}: no samples.npz and no numbered PNGs")
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    side = path / "labels.npy"
    labels = np.load(side).astype(np.int64)[: len(images)] if side.is_file() else None
    return SampleSet(images, labels, str(path))


def load_sample_set(path: str | Path) -> SampleSet:
    """A sample set from a ``.npz`` file or a sample directory (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        npz = path / "samples.npz"
        return _load_npz(npz) if npz.is_file() else _load_png_dir(path)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path)
    raise FileNotFoundError(f"{path}: not a sample directory or an existing .npz file")


# ----------------------------------------------------------------------------- digits metrics
_REAL_STATS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def real_digit_stats(classifier) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of all real digits (cached per classifier object)."""
    key = str(id(classifier))
    if key not in _REAL_STATS:
        images, _ = real_digits_uint8()
        feats, _ = classify(classifier, from_uint8(images))
        _REAL_STATS[key] = gaussian_stats(feats.numpy())
    return _REAL_STATS[key]


def evaluate_digits(samples: SampleSet, classifier, reference: SampleSet | None = None) -> dict:
    """digits-FID vs real digits, class accuracy (when labels exist), PSNR/MSE vs ``reference``."""
    feats, pred = classify(classifier, from_uint8(samples.images))
    mu, sigma = gaussian_stats(feats.numpy())
    out: dict = {"num_samples": len(samples), "digits_fid": frechet_distance(
        mu, sigma, *real_digit_stats(classifier))}
    if samples.labels is not None:
        out["class_accuracy"] = class_accuracy(pred.numpy(), samples.labels[: len(pred)])
    if reference is not None:
        out.update(psnr_mse(samples.images, reference.images))
    return out


def _features(samples: SampleSet, classifier) -> np.ndarray:
    return classify(classifier, from_uint8(samples.images))[0].numpy()


def paired_fid_difference(a: SampleSet, b: SampleSet, classifier, rounds: int = 50,
                          seed: int = 0) -> dict[str, float]:
    """digits-FID(a) − digits-FID(b) and its bootstrap standard deviation.

    ``a`` and ``b`` are runs of the same seeds, so sample i of one pairs with sample i of the other:
    each bootstrap round draws one set of indices for both, which keeps the pairing and measures the
    noise of the *difference* (much smaller than the noise of either FID alone).
    """
    fa, fb = _features(a, classifier), _features(b, classifier)
    if len(fa) != len(fb):
        raise ValueError(f"paired sets differ in size: {len(fa)} vs {len(fb)}")
    real = real_digit_stats(classifier)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(rounds):
        idx = rng.integers(0, len(fa), len(fa))
        deltas.append(frechet_distance(*gaussian_stats(fa[idx]), *real)
                      - frechet_distance(*gaussian_stats(fb[idx]), *real))
    full = (frechet_distance(*gaussian_stats(fa), *real)
            - frechet_distance(*gaussian_stats(fb), *real))
    return {"delta": float(full), "std": float(np.std(deltas, ddof=1))}
