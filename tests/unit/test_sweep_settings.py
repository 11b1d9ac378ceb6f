"""How ``dice-ds eval --sweep`` and ``dice-ds tune --evidence`` hand each run its settings: a
``settings.json`` tree read with ``--config`` (dice_ds/eval/sweep.py), never flags; the sampler
reads exactly the settings the flag command it replaces gave, and the run stamp decides reuse."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dice_ds.ds_config import write_config
from dice_ds.eval import sweep
from dice_ds.eval.sweep import MODES, SweepConfig, rejected_by_sampler, run_mode, run_settings
from dice_ds.modes import DICE, Mode, by_key
from dice_ds.options import parse_options
from dice_ds.tune.evidence import EVIDENCE_MODES
from dice_ds.tune.search import Policy

CKPT = str(Path(__file__).parents[2] / "dice_ds" / "assets" / "digits_dit_moe.pt")


def _flag_command(cfg: SweepConfig, mode: Mode, out: Path) -> list[str]:
    """The ``dice-ds sample`` flags the sweep launched before its runs carried settings trees."""
    cmd = ["--model", "digits", "--ckpt", cfg.ckpt, "--vae", "identity", "--device", "cpu",
           "--num-fid-samples", str(cfg.num_samples), "--per-proc-batch-size", str(cfg.batch),
           "--global-seed", str(cfg.seed), "--cfg-scale", str(cfg.cfg_scale),
           "--sample-dir", str(out)]
    if cfg.steps is not None:
        cmd += ["--num-sampling-steps", str(cfg.steps)]
    return cmd + list(mode.flags)


_POLICIES = (Mode("dice", "DICE (fixed)", DICE),
             Mode("tuned", "tuned", Policy("interweaved", (0, 2), 1, 0, 5, 2).settings()),
             Mode("tuned-d", "tuned", Policy("displaced", (1,), 0, 2, 0, 1).settings()),
             *(by_key(k) for k in EVIDENCE_MODES))


@pytest.mark.parametrize("steps", [None, 3])
def test_the_sampler_reads_the_settings_the_flag_command_gave(tmp_path, steps):
    cfg = SweepConfig(ckpt=CKPT, num_samples=20, steps=steps, batch=10, seed=7, cfg_scale=2.5)
    for mode in (*MODES, *_POLICIES):
        out = tmp_path / mode.key
        s, rejected = rejected_by_sampler(cfg, mode, out)
        assert rejected is None, (mode.key, rejected)
        argv = write_config(s, out / "settings.json")
        assert argv == ["--config", str(out / "settings.json")]
        ran, old = parse_options(argv), parse_options(_flag_command(cfg, mode, out))
        assert ran.model_dump() == old.model_dump(), mode.key
        assert ran.names() == old.names(), mode.key       # run.json's args
        assert ran.explicit == old.explicit, mode.key     # what counts as given


def test_a_mode_the_tree_rejects_is_not_available(tmp_path):
    bad = Mode("bad", "bad", {"ep": True, "ep_async_noskip_step": 0})
    s, rejected = rejected_by_sampler(SweepConfig(ckpt=CKPT), bad, tmp_path)
    assert s is None and "--ep-async-noskip-step" in rejected
    res = run_mode(SweepConfig(ckpt=CKPT, work_dir=str(tmp_path)), bad, lambda m: None)
    assert res["status"] == "not available" and not (tmp_path / "bad").exists()


def test_runs_launch_with_config_only_and_the_stamp_decides_reuse(tmp_path, monkeypatch):
    cfg = SweepConfig(ckpt=CKPT, num_samples=4, steps=3, batch=2, work_dir=str(tmp_path))
    mode = by_key("dice")
    launched = []

    def fake_run(cmd, **kw):
        launched.append(cmd)
        out = Path(parse_options(cmd[cmd.index("dice_ds.sample") + 1:]).sample_dir)
        np.savez(out / "samples.npz", arr_0=np.zeros((cfg.num_samples, 8, 8, 1), np.uint8))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    res = run_mode(cfg, mode, lambda m: None)
    assert res["status"] == "ok" and len(launched) == 1
    cmd = launched[0]
    out = tmp_path / "dice"
    assert cmd[cmd.index("dice_ds.sample") + 1:] == ["--config", str(out / "settings.json")]
    assert parse_options(cmd[-2:]).model_dump() == run_settings(cfg, mode, out).model_dump()
    assert run_mode(cfg, mode, lambda m: None)["reused"] and len(launched) == 1  # same stamp
    # other settings: the old samples are deleted and the run is made again with the new tree
    cfg.cfg_scale = 4.0
    (out / "marker").write_text("old run")
    assert run_mode(cfg, mode, lambda m: None)["status"] == "ok" and len(launched) == 2
    assert not (out / "marker").exists()
    assert json.loads((out / "settings.json").read_text())["dice"]["sampling"]["cfg_scale"] == 4.0
    assert json.loads((out / sweep.STAMP).read_text())["nproc"] == cfg.nproc
