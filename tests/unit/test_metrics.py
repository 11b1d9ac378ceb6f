"""Offline quality metrics on known inputs: Fréchet distance of known Gaussians, identical sets (FID 0,
PSNR ∞), shuffled labels (accuracy ≈ 10 %), sample-set loading, the FID-50K path's errors, the eval
CLI and the sweep report."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from dice_ds.config import ConfigError
from dice_ds.data import from_uint8, load_digits_tensors, real_digits_uint8, to_uint8
from dice_ds.eval import fid as fidmod
from dice_ds.eval.classifier import load_classifier
from dice_ds.eval.metrics import (
    SampleSet,
    class_accuracy,
    evaluate_digits,
    frechet_distance,
    gaussian_stats,
    load_sample_set,
    psnr_mse,
)


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def real():
    return real_digits_uint8()


# ----------------------------------------------------------------------------- Fréchet distance
def test_frechet_1d_closed_form():
    # N(0, 1) vs N(1, 4): (0-1)^2 + 1 + 4 - 2*sqrt(1*4) = 2
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_is_rotation_invariant_and_zero_on_equal():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    d = frechet_distance(mu, sigma, mu + 1, 2 * sigma)
    d_rot = frechet_distance(q @ mu, q @ sigma @ q.T, q @ (mu + 1), q @ (2 * sigma) @ q.T)
    assert d == pytest.approx(d_rot, rel=1e-7)


def test_frechet_of_samples_approaches_population_value():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, size=(20000, 3))
    y = rng.normal(0.5, 2, size=(20000, 3))
    # 3 * (0.5^2 + (1 - 2)^2) = 3.75
    assert frechet_distance(*gaussian_stats(x), *gaussian_stats(y)) == pytest.approx(3.75, rel=0.05)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- digits metrics
def test_identical_sets_fid_zero_psnr_infinite(clf, real):
    images, labels = real
    s = SampleSet(images, labels, "real")
    out = evaluate_digits(s, clf, reference=s)
    assert out["digits_fid"] == pytest.approx(0.0, abs=1e-6)
    assert out["mse"] == 0.0 and math.isinf(out["psnr_db"])
    assert out["class_accuracy"] > 0.98


def test_shuffled_labels_give_chance_accuracy(clf, real):
    images, labels = real
    shuffled = np.random.default_rng(0).permutation(labels)
    acc = evaluate_digits(SampleSet(images, shuffled, "shuffled"), clf)["class_accuracy"]
    assert 0.05 < acc < 0.15


def test_noise_is_far_from_digits(clf, real):
    images, labels = real
    subset = SampleSet(images[:300], labels[:300], "real")
    noise = np.random.default_rng(0).integers(0, 256, size=images[:300].shape, dtype=np.uint8)
    fid_real = evaluate_digits(subset, clf)["digits_fid"]
    fid_noise = evaluate_digits(SampleSet(noise, labels[:300], "noise"), clf)["digits_fid"]
    assert fid_noise > 20 * fid_real


def test_psnr_known_values():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr_mse(a, np.full_like(a, 255)) == {"mse": 1.0, "psnr_db": 0.0}
    b = a.copy()
    b[0, 0, 0, 0] = 255  # one of 96 values differs by the full range
    out = psnr_mse(a, b)
    assert out["mse"] == pytest.approx(1 / 96)
    assert out["psnr_db"] == pytest.approx(10 * math.log10(96))
    with pytest.raises(ValueError, match="same seeds"):
        psnr_mse(a, a[:1])


def test_class_accuracy_checks_shapes():
    assert class_accuracy([1, 2, 3], [1, 2, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        class_accuracy([1, 2], [1, 2, 3])


def test_uint8_round_trip_matches_identity_vae():
    x, _ = load_digits_tensors("test")
    u8 = to_uint8(x)
    assert u8.shape == (len(x), 16, 16, 3) and u8.dtype == np.uint8
    assert (from_uint8(u8) - x).abs().max() < 1 / 127.5 + 1e-6


# ----------------------------------------------------------------------------- loading
def test_load_npz_dir_and_pngs(tmp_path, real):
    from PIL import Image

    images, labels = real[0][:6], real[1][:6]
    np.savez(tmp_path / "s.npz", arr_0=images, labels=labels)
    s = load_sample_set(tmp_path / "s.npz")
    assert (s.images == images).all() and (s.labels == labels).all()
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(run / "samples" / f"{i:06d}.png")
    np.save(run / "labels.npy", labels)
    s = load_sample_set(run)
    assert (s.images == images).all() and (s.labels == labels).all()
    np.savez(run / "samples.npz", arr_0=images)  # a samples.npz wins; labels.npy beside it
    assert (load_sample_set(run).labels == labels).all()
    with pytest.raises(FileNotFoundError):
        load_sample_set(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- FID-50K path errors
def test_fid_errors_say_what_to_supply(tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="VIRTUAL_imagenet256_labeled.npz"):
        fidmod.check_inputs(str(samples), None, "w.pth")
    with pytest.raises(ConfigError, match="weights-inception-2015-12-05"):
        fidmod.check_inputs(str(samples), str(samples), None)
    with pytest.raises(ConfigError, match="--inception-weights .*no such file"):
        fidmod.check_inputs(str(samples), str(samples), str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, foo=np.zeros(3))
    with pytest.raises(ConfigError, match="'arr_0'.*'mu'"):
        fidmod.read_reference(bad)
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    ref = fidmod.read_reference(stats)
    assert ref.images is None and ref.mu.shape == (2048,)
    np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ConfigError, match="2048"):
        fidmod.read_reference(stats)


# ----------------------------------------------------------------------------- CLI and report
def test_eval_cli_digits_and_errors(tmp_path, real, capsys):
    from dice_ds.eval.cli import main

    images, labels = real[0][:200], real[1][:200]
    np.savez(tmp_path / "a.npz", arr_0=images, labels=labels)
    assert main([str(tmp_path / "a.npz"), "--reference", str(tmp_path / "a.npz"),
                 "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["psnr_db"] == "inf" and out["class_accuracy"] > 0.95 and out["num_samples"] == 200
    capsys.readouterr()
    assert main([str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.npz" in err[0]
    assert main(["--fid", str(tmp_path / "a.npz")]) == 2
    assert "--reference" in capsys.readouterr().err


def test_sweep_report_and_ordering(tmp_path):
    from dice_ds.eval.sweep import SweepConfig, ordering_statement, write_report

    rows = [{"mode": m, "flags": "", "note": "", "status": "ok", "digits_fid": f,
             "class_accuracy": 0.9, "psnr_db": p, "mse": 0.0, "fid_delta_vs_sync": f - 1.0,
             "fid_delta_std": 0.6}
            for m, f, p in (("sync EP", 1.0, math.inf), ("DICE", 3.0, 30.0),
                            ("interweaved", 2.0, 25.0), ("displaced EP", 4.0, 20.0))]
    assert "DIFFERS" in ordering_statement(rows)
    assert "2 paired-bootstrap std: DICE, displaced EP." in ordering_statement(rows)
    rows[1]["digits_fid"] = 1.5
    assert ordering_statement(rows).startswith("Same digits-FID ordering")
    rows.append({"mode": "displaced SP", "flags": "--sp --sp-async", "note": "",
                 "status": "not available", "error": "not implemented yet"})
    cfg = SweepConfig(ckpt="x.pt", num_samples=20, batch=10)
    result = {"config": cfg.__dict__, "rows": rows, "ordering": ordering_statement(rows),
              "real_digits_floor": {"num_samples": 20, "digits_fid": 0.5, "class_accuracy": 1.0}}
    doc = tmp_path / "q.md"
    doc.write_text("# Title\n\n<!-- sweep:begin -->\nold\n<!-- sweep:end -->\n\ntail text\n")
    md, js = write_report(result, str(tmp_path / "q"), "dice-ds eval --sweep")
    text = md.read_text()
    assert text.startswith("# Title") and text.endswith("tail text\n") and "old" not in text
    assert "| DICE |" in text and "∞" in text and "not available" in text
    assert json.loads(js.read_text())["command"] == "dice-ds eval --sweep"


# ----------------------------------------------------------------------------- FID-50K path, end to end
class _StubModule(__import__("types").ModuleType):
    """Stands in for torchvision, which torch-fidelity imports for extractors this path never uses."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def _torch_fidelity_or_skip(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity not installed (extra 'fid')")
    try:
        import torchvision  # noqa: F401
    except Exception:  # the PyPI wheel fails to load on a CPU-only torch
        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms",
                     "torchvision.transforms.functional", "torchvision.models"):
            stub = _StubModule(name)
            monkeypatch.setitem(sys.modules, name, stub)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, stub)
    return fidmod.import_torch_fidelity()


def test_fid_path_end_to_end_with_random_inception(tmp_path, monkeypatch):
    """Real torch-fidelity code with random InceptionV3 weights: identical sets give FID 0."""
    import torch

    extractor_cls, _, _ = _torch_fidelity_or_skip(monkeypatch)
    torch.save({}, tmp_path / "empty.pth")
    monkeypatch.setattr(extractor_cls, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    random_net = extractor_cls("inception-v3-compat", list(fidmod.FEATURES),
                               feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(random_net.state_dict(), tmp_path / "inception.pth")
    monkeypatch.undo()
    _torch_fidelity_or_skip(monkeypatch)
    images = np.random.default_rng(0).integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    out = fidmod.full_scale_metrics(str(tmp_path / "samples.npz"), str(tmp_path / "samples.npz"),
                                    str(tmp_path / "inception.pth"), batch=10)
    assert out["num_samples"] == 10 and out["fid_reference_statistics"] == "reference images"
    assert out["fid"] == pytest.approx(0.0, abs=1e-3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["inception_score_mean"] > 0


def test_missing_torch_fidelity_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="pip install 'dice_ds\\[fid\\]'"):
        fidmod.import_torch_fidelity()


def test_paired_fid_difference(clf, real):
    from dice_ds.eval.metrics import paired_fid_difference

    a = SampleSet(real[0][:300], real[1][:300], "real")
    same = paired_fid_difference(a, a, clf, rounds=5)
    assert same == {"delta": 0.0, "std": 0.0}
    noisy = a.images.astype(np.int16) + np.random.default_rng(0).integers(-40, 41, a.images.shape)
    b = SampleSet(noisy.clip(0, 255).astype(np.uint8), a.labels, "noisy")
    d = paired_fid_difference(b, a, clf, rounds=10)
    assert d["delta"] > 2 * d["std"] > 0
