"""``DiTMoEPipeline`` on 1 and 2 ranks: the README example equals ``dice-ds sample`` bit for bit.

Three launches in all:
1. one pair of gloo ranks runs, per mode (DP, displaced EP, interweaved EP, sync SP, DICE), the
   CLI's own path (``prepare`` -> ``run``, latents only) and ``examples/pipeline_digits.py`` with
   the CLI's labels (``--cli-labels --latents``); the README's five lines (DICE, PIL on rank 0);
   then, on one pipeline object, repeated calls with other step counts and batch sizes against a
   fresh pipeline, the collective argument check (one line on every rank, the pipeline usable
   afterwards) and ``output_ranks='all'``;
2. one rank runs the CLI (DP) and the example without a config;
3. a real ``torchrun --nproc_per_node 2 examples/pipeline_digits.py configs/ds/digits_dice.json``
   (the README's "done when"): PIL images on rank 0 only, equal to the in-process DICE run's.
"""
import json
import os
import runpy
import subprocess
import sys

import numpy as np
from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "pipeline_digits.py")
DICE = os.path.join(ROOT, "configs", "ds", "digits_dice.json")
ASSET = os.path.join(ROOT, "dice_ds", "assets", "digits_dit_moe.pt")
STEPS, B = 4, 10
MODEL = {"model": {"name": "digits", "ckpt": ASSET}, "vae": {"type": "identity"}}
CONFIGS = {  # ds_config layout; the example's from_pretrained("digits") names the same weights
    "dp": {"dice": MODEL},
    "displaced": {"moe": {"enabled": True},
                  "dice": {**MODEL, "async": {"enabled": True, "mode": "displaced", "layers": "all"}}},
    "interweaved": {"moe": {"enabled": True}, "dice": {
        **MODEL, "async": {"enabled": True, "mode": "interweaved", "layers": "all"}}},
    "sp": {"dice": {**MODEL, "sp": {"enabled": True}}},
}


def _example(*argv):
    saved = sys.argv
    sys.argv = [EXAMPLE, *argv]
    try:
        runpy.run_path(EXAMPLE, run_name="__main__")
    finally:
        sys.argv = saved


def _cli(config, out, world):
    from dice_ds.options import parse_options
    from dice_ds.sample.job import prepare, run

    run(prepare(parse_options(["--config", config, "--num-fid-samples", str(B),
                               "--per-proc-batch-size", str(B // world), "--num-sampling-steps",
                               str(STEPS), "--vae", "none", "--sample-dir", out])))


def _readme_snippet(out):
    """The README's Python API example as written, with the config made absolute, 4 steps and
    the PNG written to ``out``."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in (('"configs/ds/digits_dice.json"', repr(DICE)),
                     ("num_inference_steps=50", f"num_inference_steps={STEPS}"),
                     ('"digit_0.png"', repr(os.path.join(out, "digit_0.png")))):
        assert old in code, old
        code = code.replace(old, new)
    assert len(code.strip().splitlines()) <= 6  # the import, a blank line and five lines
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})


def _repeated_calls(rank):
    """Calls with other steps and batch sizes on one pipeline equal a fresh pipeline's first call."""
    from dice_ds import DiTMoEPipeline

    pipe = DiTMoEPipeline.from_pretrained("digits", config=DICE)
    kw = dict(output_type="latent", seed=3)
    first = pipe(class_labels=[1, 2, 3, 4, 5, 6], num_inference_steps=4, **kw)
    second = pipe(class_labels=[7, 8, 9], num_inference_steps=7, **kw)  # padded to 4 (EP)
    third = pipe(class_labels=[1, 2, 3, 4, 5, 6], num_inference_steps=4, **kw)
    fresh = DiTMoEPipeline.from_pretrained("digits", config=DICE)(
        class_labels=[7, 8, 9], num_inference_steps=7, **kw)
    both = pipe(class_labels=[0, 1], num_inference_steps=2, output_ranks="all", **kw)
    return pipe, {"first": first.images, "second": second.images, "third": third.images,
                  "fresh": fresh.images, "all": both.images, "stats": second.stats}


def _disagreements(pipe, rank):
    """Arguments that differ between ranks: one ConfigError line on every rank."""
    from dice_ds.config import ConfigError

    lines = []
    for kw in ({"num_inference_steps": 4 + rank}, {"class_labels": [1, 99 if rank else 2]}):
        try:
            pipe(**{"class_labels": [1, 2], "output_type": "latent", **kw})
        except ConfigError as e:
            lines.append(str(e))
    after = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="latent")
    return lines, after.images is not None


def _two_ranks(rank, world, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    for mode, cfg in CONFIGS.items():
        path = os.path.join(out, f"{mode}.json")
        if rank == 0:
            json.dump(cfg, open(path, "w"))
        import torch.distributed as dist

        dist.barrier()
        _cli(path, os.path.join(out, "cli", mode), world)
        os.makedirs(os.path.join(out, "api", mode), exist_ok=True)
        _example(path, "--steps", str(STEPS), "--cli-labels", "--latents",
                 "--out", os.path.join(out, "api", mode))
    _cli(DICE, os.path.join(out, "cli", "dice"), world)
    for sub, extra in (("dice", ["--cli-labels", "--latents"]), ("dice_png", [])):
        os.makedirs(os.path.join(out, "api", sub), exist_ok=True)
        _example(DICE, "--steps", str(STEPS), *extra, "--out", os.path.join(out, "api", sub))
    os.makedirs(os.path.join(out, "readme"), exist_ok=True)
    _readme_snippet(os.path.join(out, "readme"))
    pipe, calls = _repeated_calls(rank)
    calls["disagree"], calls["usable_after"] = _disagreements(pipe, rank)
    return calls


def _one_rank(rank, world, out):
    path = os.path.join(out, "dp.json")
    json.dump(CONFIGS["dp"], open(path, "w"))
    _cli(path, os.path.join(out, "cli"), world)
    _example("--steps", str(STEPS), "--cli-labels", "--latents", "--out", out)
    return rank


def test_example_equals_the_cli_at_one_and_two_ranks_and_under_torchrun(tmp_path):
    out = str(tmp_path)
    r0, r1 = run_ranks(_two_ranks, 2, tmp_path, out, timeout=300)
    for mode in [*CONFIGS, "dice"]:
        cli = np.load(tmp_path / "cli" / mode / "latents.npz")["arr_0"]
        api = np.load(tmp_path / "api" / mode / "latents.npy")
        assert cli.shape == (B, 1, 16, 16) and np.array_equal(api, cli), mode
    from PIL import Image

    assert os.listdir(tmp_path / "readme") == ["digit_0.png"]  # the README's lines, on rank 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "readme" / "digit_0.png")),
                          np.asarray(Image.open(tmp_path / "api" / "dice_png" / "digit_0.png")))
    assert not np.array_equal(np.load(tmp_path / "api" / "dice" / "latents.npy"),
                              np.load(tmp_path / "api" / "dp" / "latents.npy"))  # stale: differs

    # repeated calls reuse model and runtime and equal fresh runs; rank 1 receives nothing
    assert np.array_equal(r0["second"], r0["fresh"]) and np.array_equal(r0["third"], r0["first"])
    assert r0["second"].shape == (3, 1, 16, 16) and r1["second"] is None
    assert np.array_equal(r0["all"], r1["all"]) and r0["all"].shape == (2, 1, 16, 16)
    stats = r0["stats"]
    assert stats["mode"] == "interweaved" and stats["num_inference_steps"] == 7
    assert stats["bytes_exchanged"] > 0 and stats["cache_peak_bytes"] > 0 and stats["seconds"] > 0
    assert sorted(stats["runtime"]["sync_steps"]) == [7]  # the 7-step schedule, not the 4-step one

    # ranks that disagree: one line on every rank, naming the argument; the pipeline still works
    for rank, r in enumerate((r0, r1)):
        steps, labels = r["disagree"]
        assert "\n" not in steps + labels
        assert "rank 1 has num_inference_steps=5 but rank 0 has num_inference_steps=4" in steps
        assert ("class_labels: 99 is not a class" in labels) and (rank == 1 or "rank 1" in labels)
        assert r["usable_after"] == (rank == 0)

    # one rank, no config (DP): the same latents as the CLI's on one rank (and, here, as on two:
    # DP's per-rank batch differs, 10 vs 5, which may round differently on another CPU)
    (tmp_path / "one").mkdir()
    run_ranks(_one_rank, 1, tmp_path, str(tmp_path / "one"))
    one = np.load(tmp_path / "one" / "latents.npy")
    assert np.array_equal(one, np.load(tmp_path / "one" / "cli" / "latents.npz")["arr_0"])
    assert np.allclose(one, np.load(tmp_path / "cli" / "dp" / "latents.npz")["arr_0"], atol=1e-5)

    # the README's torchrun example: DICE on 2 ranks, PIL images on rank 0
    (tmp_path / "tr").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           EXAMPLE, DICE, "--steps", str(STEPS), "--out", str(tmp_path / "tr")]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "tr"))
    assert names == [f"digit_{i}.png" for i in range(B)]
    for name in names:
        got, want = Image.open(tmp_path / "tr" / name), Image.open(tmp_path / "api" / "dice_png" / name)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want)), name
