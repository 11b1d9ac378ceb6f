"""Nothing silent (issue 21 items 3, 5, 6) on one process: a non-finite step stops the call with
one line naming the step (dice_ds/pipeline/denoise.py) and ``dice-ds sample`` writes nothing of
that batch; the call's bounds and types (dice_ds/pipeline/call.py); ``from_pretrained``'s
arguments (dice_ds/pipeline/prepare.py); the memory check before building
(dice_ds/pipeline/resources.py); a full disk (dice_ds/outputs.py). Several ranks:
tests/multirank/test_nonfinite_ranks.py."""
import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dice_ds.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "dice_ds", "assets", "digits_dit_moe.pt")


@pytest.fixture(scope="module")
def digits():
    from dice_ds import DiTMoEPipeline

    return DiTMoEPipeline.from_pretrained("digits", world_size=1)


def _nan_from_step(monkeypatch, k: int):
    """The model's prediction turns NaN from the k-th forward on (the loop's ``predict``)."""
    import dice_ds.pipeline.denoise as denoise

    calls = [0]
    real = denoise.predict

    def predict(*args, **kwargs):
        calls[0] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls[0] >= k else out

    monkeypatch.setattr(denoise, "predict", predict)
    return calls


def test_a_non_finite_step_stops_the_call_with_one_line_naming_the_step(digits, monkeypatch):
    from dice_ds.pipeline.denoise import NonFiniteOutputError

    calls = _nan_from_step(monkeypatch, 3)
    with pytest.raises(NonFiniteOutputError) as e:
        digits(class_labels=[1, 2], num_inference_steps=6, seed=1)
    text = str(e.value)
    assert "\n" not in text and text.startswith("non-finite output at step 3/6: 512 of 512")
    assert "the model's prediction was already non-finite" in text
    assert "only the step is named" in text
    assert calls[0] == 3  # stopped at the step: no forward after it
    assert isinstance(e.value, ConfigError)  # one line, exit code 2 in the CLI
    monkeypatch.undo()
    assert digits(class_labels=[1, 2], num_inference_steps=2, seed=1).images  # next call fine


def test_an_overflowing_update_is_named_and_a_non_finite_decode_is_refused(digits, monkeypatch):
    from dice_ds.pipeline import output
    from dice_ds.pipeline.denoise import FiniteCheck, LoopPosition, NonFiniteOutputError

    pos = LoopPosition()
    pos.begin(4)
    pos.at(2)
    with pytest.raises(NonFiniteOutputError, match="step 3/4: 1 of 2 values of x .* the update "
                                                   "overflowed"):
        FiniteCheck()(torch.tensor([1.0, float("inf")]), torch.ones(2), pos, "x")

    class Overflowing:
        def decode_float(self, z):
            return z * float("inf")

    with pytest.raises(NonFiniteOutputError, match="non-finite output of the decoder"):
        output.encode(torch.ones(1, 1, 2, 2), "pil", Overflowing())
    lat = digits(class_labels=[3], num_inference_steps=2, seed=4, output_type="latent").images
    pil = digits(class_labels=[3], num_inference_steps=2, seed=4).images
    from dice_ds.vae import to_uint8_nhwc

    assert np.array_equal(np.asarray(pil[0]), to_uint8_nhwc(lat)[0])  # same bytes as before


_CLI_WITH_NAN = """
import sys
import dice_ds.pipeline.denoise as denoise
real, calls = denoise.predict, [0]
def predict(*args, **kwargs):
    calls[0] += 1
    out = real(*args, **kwargs)
    return out * float("nan") if calls[0] >= 2 else out
denoise.predict = predict
from dice_ds.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_cli_writes_nothing_of_a_non_finite_batch(tmp_path):
    """A real process (the CLI ends a failed rank with os._exit): the prediction turns NaN at
    step 2 of the first batch; one line, exit code 2, no sample file, no npz, no run.json."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_WITH_NAN, "sample", "--model", "digits", "--ckpt", SHIPPED,
         "--vae", "identity", "--num-fid-samples", "4", "--per-proc-batch-size", "4",
         "--num-sampling-steps", "3", "--sample-dir", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    lines = [ln.split("\r")[-1] for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("dice-ds sample: error: non-finite output at step 2/3"), lines[0]
    assert not os.listdir(out / "samples")
    assert not (out / "samples.npz").exists() and not (out / "run.json").exists()


@pytest.mark.parametrize("kwargs, needle", [
    ({"class_labels": [1], "seed": 5, "generator": torch.Generator()},
     "seed and generator both decide the draws: pass one of them"),
    ({"class_labels": [1], "latents": torch.zeros(1, 1, 16, 16, dtype=torch.complex64)},
     "latents: dtype complex64; pass floating-point noise"),
    ({"class_labels": [1], "latents": torch.zeros(1, 1, 16, 16, dtype=torch.bool)},
     "latents: dtype bool; pass floating-point noise"),
    ({"class_labels": [1], "latents": np.zeros((1, 1, 16, 16), np.int64)},
     "latents: dtype int64; pass floating-point noise"),
    ({"class_labels": [1], "latents": torch.full((1, 1, 16, 16), 1e38)},
     "latents: |value| up to 1e+38, must be <= 10000"),
    ({"class_labels": [1], "latents": "noise"}, "latents: a str is not a tensor"),
    ({"class_labels": [1], "guidance_scale": 1e308}, "guidance_scale=1e+308 must be <= 10000"),
    ({"class_labels": [1], "guidance_scale": "2"}, "guidance_scale='2': must be a finite number"),
    ({"class_labels": [1], "guidance_scale": np.float32("nan")}, "must be a finite number"),
    ({"class_labels": [1], "num_inference_steps": 10**12},
     "num_inference_steps=1000000000000 must be in [1, 10000]"),
    ({"class_labels": [1], "num_inference_steps": 2.0}, "num_inference_steps=2.0: must be an int"),
    ({"class_labels": [1], "num_inference_steps": np.bool_(True)}, "must be an integer"),
    ({"class_labels": [1], "seed": "7"}, "seed='7': must be an integer"),
    ({"class_labels": [1], "batch_size": "1"}, "batch_size='1': must be an integer"),
    ({"class_labels": [1], "first_index": 1.5}, "first_index=1.5: must be an integer"),
    ({"class_labels": [1.5]}, "class_labels: pass a non-empty list of integer class ids"),
    ({"class_labels": [1], "output_type": ["pil"]}, "output_type=['pil']: use one of"),
    ({"class_labels": [1], "output_ranks": 0}, "output_ranks=0: use one of"),
    ({"class_labels": [1], "return_dict": "yes"}, "return_dict='yes': must be True or False"),
    ({"class_labels": [1], "reset_stats": None}, "reset_stats=None: must be True or False"),
    ({"class_labels": [1], "output_ranks": "local", "local_limit": "2"},
     "local_limit='2': only with output_ranks='local', and an integer >= 0"),
])
def test_bad_call_arguments_are_one_line_naming_the_argument(digits, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        digits(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_numpy_scalars_are_accepted_where_their_value_is_valid(digits):
    kw = dict(output_type="latent")
    ref = digits(class_labels=[3], num_inference_steps=2, guidance_scale=2.0, seed=4, **kw)
    got = digits(class_labels=np.int64(3), num_inference_steps=np.int64(2),
                 guidance_scale=np.float32(2.0), seed=np.int64(4), **kw)
    assert torch.equal(ref.images, got.images) and got.stats["guidance_scale"] == 2.0
    many = digits(class_labels=np.array([3, 4], np.int32), batch_size=np.int64(2),
                  num_inference_steps=np.int32(2), first_index=np.uint8(0), seed=4, **kw)
    assert many.images.shape == (2, 1, 16, 16)
    wide = digits(class_labels=[3], num_inference_steps=2, latents=many.images[:1].double(), **kw)
    assert wide.images.shape == (1, 1, 16, 16)  # float64 latents: a float, so accepted


def test_seed_is_not_ignored_beside_a_generator_any_more(digits):
    g = torch.Generator().manual_seed(1)
    with pytest.raises(ConfigError, match="seed and generator"):
        digits(class_labels=[1], seed=5, generator=g, num_inference_steps=2)


def test_from_pretrained_none_with_a_named_model_still_works():
    from dice_ds.pipeline.prepare import pipeline_options

    assert pipeline_options(None, init="random", model="debug").model == "debug"
    assert pipeline_options(config={"dice": {"model": {"name": "debug", "init": "random"}}}
                            ).model == "debug"


# -- memory ------------------------------------------------------------------------------------


def test_a_run_that_cannot_fit_is_refused_before_building_in_one_line(capsys):
    from dice_ds import cli

    t0 = time.monotonic()
    code = cli.main(["sample", "--model", "DiT-XL/2", "--depth", "100000000", "--init", "random",
                     "--vae", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "GiB per rank (weights alone, as dice-ds plan counts them)" in err
    assert "--ep" in err and "--dtype bf16" in err and "--skip-memory-check" in err
    assert time.monotonic() - t0 < 5  # no schedule, no model: the weights alone decide


def test_the_memory_check_counts_the_plan_the_node_and_the_override(monkeypatch):
    from dice_ds.options import parse_options
    from dice_ds.pipeline import resources
    from dice_ds.pipeline.prepare import prepare_spec

    base = ["--model", "DiT-XL/2", "--depth", "2", "--init", "random", "--vae", "none"]
    spec = prepare_spec(parse_options(base), 1)
    planned = sum(resources.planned_bytes(spec.opts, spec.model_cfg, spec.plan).values())
    weights = resources.weight_bytes(spec.opts, spec.model_cfg, spec.plan)
    part = resources.planned_bytes(spec.opts, spec.model_cfg, spec.plan)
    assert weights == part["expert_weights"] + part["dense_weights"]
    monkeypatch.setattr(resources, "available_bytes", lambda device: (int(planned * 1.5), "X"))
    prepare_spec(parse_options(base), 1)  # fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks of this node: 2x planned
    with pytest.raises(ConfigError, match=r"per rank \(weights, activations and caches, as "
                                          r"dice-ds plan counts them\) x 2 ranks on this node "
                                          r"but X is"):
        prepare_spec(parse_options(base), 2)
    prepare_spec(parse_options(base + ["--skip-memory-check"]), 2)
    prepare_spec(parse_options(base + ["--per-proc-batch-size", "4"]), 2)  # smaller batch fits


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    from dice_ds.pipeline import resources

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable:   2048 kB\n")
    assert resources._meminfo_available(str(meminfo)) == 2048 * 1024
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    assert resources._cgroup_headroom(str(v2), str(tmp_path / "none")) is None
    (v2 / "memory.max").write_text("1000\n")
    (v2 / "memory.current").write_text("400\n")
    assert resources._cgroup_headroom(str(v2), str(tmp_path / "none")) == 600
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert resources._cgroup_headroom(str(tmp_path / "none"), str(v1)) is None
    available, what = resources.available_bytes("cpu")
    assert available > 0 and "this machine" in what


# -- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary(tmp_path):
    from dice_ds.outputs import DiskFullError, _atomic_write

    def full(fh):
        fh.write(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "000001.png"
    with pytest.raises(DiskFullError) as e:
        _atomic_write(str(target), full)
    assert str(e.value).startswith(f"{target}: no space left on the device of {tmp_path}")
    assert isinstance(e.value, ConfigError) and os.listdir(tmp_path) == []


def _mount_tmpfs(path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def test_a_full_disk_ends_the_cli_with_one_line_on_a_real_tmpfs(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "12k"):
        pytest.skip("needs root and tmpfs (the unit test above monkeypatches the write)")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dice_ds.cli", "sample", "--model", "digits", "--ckpt",
             SHIPPED, "--vae", "identity", "--num-fid-samples", "64", "--per-proc-batch-size",
             "32", "--num-sampling-steps", "2", "--sample-dir", str(disk / "out")],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=300)
        lines = [ln.split("\r")[-1] for ln in proc.stderr.splitlines() if "error" in ln]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert "no space left on the device of " + str(disk / "out") in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
        assert not [n for n in os.listdir(disk / "out" / "samples") if ".tmp" in n]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
