"""Every DICE mode through the sampling command line at 2 ranks; run.json reports what was realised.

Two spawned runs in all:
1. one pair of gloo ranks runs the CLI's own path (``parse_options`` -> ``prepare`` -> ``run``, i.e.
   ``python -m dice_ds.sample`` without its process launch and teardown) four times: sync EP,
   displaced, interweaved, and interweaved + selective sync (shallow async layers, warm-up, strided,
   cool-down);
2. one real ``torchrun ... -m dice_ds.cli sample`` (the ``dice-ds sample`` entry) with the full DICE
   setting: interweaved + selective sync + conditional communication (P = 2, low).

Each run.json must carry ep_size, the realised sync steps / async layers / ring / skip steps (equal to
``dice_ds.schedule.Schedule`` for the same plan), cache peak bytes, all-to-all bytes,
rows per (step, layer) and the phase breakdown; the numbers must agree with the mode: no cache for
sync EP, interweaved <= 55 % of displaced's cache, half the dispatch rows on skip steps.
"""
import json
import os
import subprocess
import sys

import numpy as np

from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "ds", "debug_dp.json")
STEPS, BATCH = 8, 2
TOKENS = 2 * BATCH * 16  # CFG doubles the batch; debug latent 8x8, patch 2 -> 16 tokens per image
COMMON = ["--config", CONFIG, "--num-fid-samples", "4", "--per-proc-batch-size", str(BATCH),
          "--num-sampling-steps", str(STEPS), "--vae", "none"]
SELECTIVE = ["--ep", "--ep-async", "--ep-async-pipeline", "--ep-async-mode", "shallow",
             "--ep-async-warm-up", "1", "--strided-sync", "4", "--ep-async-cool-down", "1"]
MODES = {
    "sync": ["--ep"],
    "displaced": ["--ep", "--ep-async", "--ep-async-mode", "all"],
    "interweaved": ["--ep", "--ep-async", "--ep-async-pipeline", "--ep-async-mode", "all"],
    "selective": SELECTIVE,
}
DICE = SELECTIVE + ["--ep-async-noskip-step", "2", "--ep-async-skip-strategy", "low"]


def _cli_runs(rank, world, out_dir, modes):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from dice_ds.options import parse_options
    from dice_ds.sample.job import prepare, run

    for name, flags in modes.items():
        run(prepare(parse_options(COMMON + flags + ["--sample-dir", os.path.join(out_dir, name)])))
    return rank


def _expected_schedule(flags):
    from dice_ds.config import get_flavor
    from dice_ds.options import build_plan, parse_options
    from dice_ds.schedule import Schedule

    cfg = get_flavor("debug")
    plan = build_plan(parse_options(COMMON + flags), world_size=2, num_experts=cfg.num_experts,
                      depth=cfg.depth)
    return Schedule.build(plan, STEPS, cfg.depth).to_json()


def _check_run(info, flags, out_dir):
    want = _expected_schedule(flags)
    assert info["ep_size"] == 2 and info["world_size"] == 2 and info["num_steps"] == STEPS
    assert sorted(info["sync_steps"]) == sorted(want["ep_sync_steps"])
    assert info["async_layers"] == want["async_layers"] and info["ring"] == want["ring"]
    skips = {str(layer): want["skip_steps"] for layer in range(want["depth"])} if want["skip_steps"] else {}
    assert info["skip_steps"] == skips
    phases = info["phase_seconds"]
    assert all(phases[k] > 0 for k in ("router", "dispatch", "experts", "combine")), phases
    assert info["sampling_seconds"] > 0 and info["a2a_bytes_sent"] > 0
    rows = info["a2a_rows_by_step"]
    for step in range(1, STEPS + 1):
        for layer in range(want["depth"]):
            expected = TOKENS if step in want["skip_steps"] else 2 * TOKENS
            assert rows[str(step)][str(layer)]["dispatch"] == expected, (step, layer)
    lat = np.load(os.path.join(out_dir, "latents.npz"))["arr_0"]
    assert lat.shape == (4, 4, 8, 8) and np.isfinite(lat).all()


def test_each_mode_through_the_cli_at_two_ranks(tmp_path):
    out = str(tmp_path)
    run_ranks(_cli_runs, 2, tmp_path, out, MODES)
    info = {m: json.load(open(os.path.join(out, m, "run.json"))) for m in MODES}
    for mode, flags in MODES.items():
        _check_run(info[mode], flags, os.path.join(out, mode))
    assert info["sync"]["ep_cache_peak_bytes"] == 0
    displaced, interweaved = info["displaced"]["ep_cache_peak_bytes"], info["interweaved"]["ep_cache_peak_bytes"]
    assert 0 < interweaved <= 0.55 * displaced, (interweaved, displaced)
    assert info["selective"]["async_layers"] == [0] and sorted(info["selective"]["sync_steps"]) == [1, 4, 7, 8]

    # the real launcher and console entry, full DICE: conditional communication on top
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dice_ds.cli", "sample", *COMMON, *DICE, "--sample-dir", "dice"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dice = json.load(open(tmp_path / "dice" / "run.json"))
    _check_run(dice, DICE, str(tmp_path / "dice"))
    assert dice["skip_steps"] == {"0": [7, 5, 3, 1], "1": [7, 5, 3, 1]}
    dispatch = lambda d: sum(v["dispatch"] for s in d["a2a_rows_by_step"].values() for v in s.values())  # noqa: E731
    assert dispatch(dice) == 0.75 * dispatch(info["selective"])  # half the rows on 4 of 8 steps
    assert dice["a2a_token_bytes_sent"] < info["selective"]["a2a_token_bytes_sent"]
