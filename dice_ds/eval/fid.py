"""The full-scale path of ``dice-ds eval --fid``: FID-50K (and IS, precision, recall) with torch-fidelity.

Owns checking what the user supplied, reading the reference, and driving torch-fidelity's InceptionV3
(the TF-2015-12-05 network that the ADM evaluator and the DiT/DICE papers use) on a ``samples.npz``:

- samples: an ``.npz`` with ``arr_0`` uint8 [N, H, W, 3] (what ``dice-ds sample`` writes);
- reference: the ADM batch ``VIRTUAL_imagenet256_labeled.npz`` (``arr_0`` images; its precomputed
  ``mu``/``sigma`` pool-3 statistics are used for FID when present) or any ``.npz`` holding ``mu``
  [2048] and ``sigma`` [2048, 2048] alone (FID only: precision/recall need reference images);
- Inception weights: a local file (``--inception-weights``); nothing is downloaded.

Reported: ``fid`` (2048-d pool features), ``inception_score_mean``/``_std`` (unbiased logits, 10
splits), and ``precision``/``recall`` (k = 3, torch-fidelity's convention) when reference images exist.
Every missing or malformed input is a ``ConfigError`` saying what to supply and where to get it,
raised before torch-fidelity is imported. torch-fidelity imports torchvision: on a CPU-only torch the
PyPI torchvision wheel does not load (it is built against CUDA torch); install the matching CPU build
of torchvision, or run this path on a CUDA machine (50K Inception forwards are GPU work anyway).

Shape legend: N images, H/W pixels, F = 2048 features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dice_ds.config import ConfigError
from dice_ds.eval.metrics import frechet_distance, gaussian_stats

ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                     "imagenet/256/VIRTUAL_imagenet256_labeled.npz")
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
FEATURES = ("2048", "logits_unbiased")


@dataclass(frozen=True)
class Reference:
    """Reference images (uint8 [N, H, W, 3]) and/or precomputed pool-3 statistics."""

    path: str
    images: np.ndarray | None
    mu: np.ndarray | None
    sigma: np.ndarray | None


def check_inputs(samples: str | None, reference: str | None, weights: str | None) -> None:
    """Raise a ConfigError naming the flag and what to supply; touches no library."""
    if reference is None:
        raise ConfigError(
            "--fid needs --reference REF.npz: the ADM reference batch VIRTUAL_imagenet256_labeled.npz "
            f"(download it from {ADM_REFERENCE_URL}) or an .npz with 'mu' [2048] and 'sigma' "
            "[2048, 2048] Inception pool-3 statistics")
    if weights is None:
        raise ConfigError(
            "--fid needs --inception-weights FILE: torch-fidelity's InceptionV3 weights "
            f"weights-inception-2015-12-05-6726825d.pth (download from {INCEPTION_WEIGHTS_URL}); "
            "nothing is downloaded at run time")
    for flag, path in (("samples", samples), ("--reference", reference),
                       ("--inception-weights", weights)):
        if path is None or not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if not str(samples).endswith(".npz"):
        raise ConfigError(f"samples {samples}: --fid takes a samples.npz (arr_0 uint8 N×H×W×3)")


def read_reference(path: str | Path) -> Reference:
    """Read an ADM reference batch or a statistics-only ``.npz``."""
    with np.load(path) as npz:
        images = np.asarray(npz["arr_0"]) if "arr_0" in npz.files else None
        has_stats = "mu" in npz.files and "sigma" in npz.files
        mu = np.asarray(npz["mu"], np.float64) if has_stats else None
        sigma = np.asarray(npz["sigma"], np.float64) if has_stats else None
    if images is None and mu is None:
        raise ConfigError(f"--reference {path}: needs 'arr_0' (uint8 images N×H×W×3) or 'mu' and "
                          f"'sigma' (pool-3 statistics), found neither")
    if mu is not None and (mu.shape != (2048,) or sigma.shape != (2048, 2048)):
        raise ConfigError(f"--reference {path}: 'mu' {mu.shape} / 'sigma' {sigma.shape} are not "
                          f"2048-d Inception pool-3 statistics")
    if images is not None:
        _check_images(images, f"--reference {path}")
    return Reference(str(path), images, mu, sigma)


def _check_images(images: np.ndarray, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"{what}: expected uint8 images [N, H, W, 3], got {images.dtype} "
                          f"{list(images.shape)}")


def import_torch_fidelity():
    """The torch-fidelity modules this path uses, or a ConfigError saying how to install them."""
    try:
        import torch_fidelity  # noqa: F401
        from torch_fidelity import metric_isc, metric_prc
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:  # ImportError, or torchvision's RuntimeError on a CPU-only torch
        raise ConfigError(
            f"--fid needs torch-fidelity and a working torchvision ({type(e).__name__}: {e}). "
            "Install with: pip install 'dice_ds[fid]' on a CUDA machine; on a CPU-only torch install "
            "the CPU torchvision build matching torch (download.pytorch.org/whl/cpu) first") from None
    return FeatureExtractorInceptionV3, metric_isc, metric_prc


def inception_features(extractor, images_NHWC: np.ndarray, device: str, batch: int = 200) -> dict:
    """{feature name: float32 [N, F] CPU tensor} for uint8 images, in batches."""
    import torch

    out: dict[str, list] = {name: [] for name in FEATURES}
    with torch.no_grad():
        for start in range(0, len(images_NHWC), batch):
            chunk = torch.from_numpy(images_NHWC[start:start + batch]).permute(0, 3, 1, 2)
            feats = extractor(chunk.contiguous().to(device))
            for name, f in zip(FEATURES, feats):
                out[name].append(f.float().cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def full_scale_metrics(samples: str, reference: str, weights: str, device: str = "cpu",
                       batch: int = 200) -> dict:
    """FID (+ IS, precision/recall) of ``samples`` against ``reference``; see the module docstring."""
    check_inputs(samples, reference, weights)
    ref = read_reference(reference)
    with np.load(samples) as npz:
        if "arr_0" not in npz.files:
            raise ConfigError(f"samples {samples}: no 'arr_0' array")
        images = np.asarray(npz["arr_0"])
    _check_images(images, f"samples {samples}")
    extractor_cls, metric_isc, metric_prc = import_torch_fidelity()
    extractor = extractor_cls("inception-v3-compat", list(FEATURES),
                              feature_extractor_weights_path=weights).to(device)
    gen = inception_features(extractor, images, device, batch)
    mu, sigma = gaussian_stats(gen["2048"].double().numpy())
    ref_feats = inception_features(extractor, ref.images, device, batch) \
        if ref.images is not None else None
    if ref.mu is not None:
        ref_mu, ref_sigma, stats_from = ref.mu, ref.sigma, "reference mu/sigma"
    else:
        ref_mu, ref_sigma = gaussian_stats(ref_feats["2048"].double().numpy())
        stats_from = "reference images"
    result = {"num_samples": len(images), "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
              "fid_reference_statistics": stats_from}
    isc = metric_isc.isc_featuresdict_to_metric(gen, "logits_unbiased", verbose=False)
    result["inception_score_mean"] = isc[metric_isc.KEY_METRIC_ISC_MEAN]
    result["inception_score_std"] = isc[metric_isc.KEY_METRIC_ISC_STD]
    if ref_feats is not None:
        prc = metric_prc.prc_featuresdict_to_metric(gen, ref_feats, "2048", save_cpu_ram=True,
                                                    verbose=False)
        result["precision"] = prc[metric_prc.KEY_METRIC_PRECISION]
        result["recall"] = prc[metric_prc.KEY_METRIC_RECALL]
    return result
