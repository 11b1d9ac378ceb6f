"""The GPU check's CPU rehearsal and its wheel installer (scripts/gpu_check.sh, docs/gpu_check.md).

``bash scripts/gpu_check.sh --dry-run --quick --ep-transport staged`` must end with every step ok
or skipped with a reason (tests/gpu all skip without CUDA), the EP modes at 2 gloo ranks through
the CPU-staging fallback (sync EP bitwise equal to the single-process model, async modes finite
and different from sync), both experts implementations timed, the plan's numbers computed and
checked against ``dice-ds plan``, and gpu_check.json / gpu_check.md written. The full
``--dry-run`` (every EP mode, an XL/2-width case) is run by hand; docs/gpu_check.md has its time.
"""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _wheels_module():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_every_step_ok_or_skipped_with_a_reason(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--quick",
                           "--ep-transport", "staged", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = rep["steps"]
    assert list(steps) == ["machine", "ep_modes", "step_time", "tests"]
    for name, st in steps.items():
        assert st["status"] in ("ok", "skipped"), (name, st["status"], st["reason"])
        assert st["status"] == "ok" or st["reason"], name
    assert rep["machine"]["cuda_available"] is False
    tests = steps["tests"]
    assert tests["status"] == "skipped" and "CUDA" in tests["reason"]
    assert tests["results"]["passed"] == 0 and tests["results"]["skipped"] >= 3

    ep = steps["ep_modes"]["results"]
    assert "staging forced" in ep["transport"] and all(v == "ok" for v in ep["probe"].values())
    (case,) = ep["cases"]
    assert case["sync_vs_single_process_bitwise"]
    assert set(case["modes"]) == {"sync", "displaced", "interweaved", "dice"}
    for key in ("displaced", "interweaved", "dice"):
        m = case["modes"][key]
        assert m["finite"] and 0 < m["rel_to_sync"] < 0.5 and m["seconds"] > 0, (key, m)
    assert case["modes"]["dice"]["remote_bytes"] < case["modes"]["interweaved"]["remote_bytes"]

    step = steps["step_time"]["results"]
    assert step["device"] == "cpu" and "mean nothing" in step["note"]
    assert step["plan"]["cli_check"] == "dice-ds plan's dp row equals these numbers"
    for impl in ("grouped", "sequential"):
        m = step["impls"][impl]
        assert m["step_seconds"] > 0 and m["efficiency_to_match"] > 0
        assert m["weights"]["expert_weights"] == step["plan"]["memory"]["expert_weights"]
    assert step["experts_alone"]["transformer_engine"].startswith("not importable")
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| step | item |" in md and "every step ok or skipped" in md


def test_wheel_selection_and_install_layout(tmp_path):
    gw = _wheels_module()
    dest = tmp_path / "whl"
    dest.mkdir()
    for name in ("pytest-0.0.1-py3-none-any.whl", "no_such_dist_xyz-1.0-py3-none-any.whl",
                 "megatron_core-0.0.1-py3-none-any.whl", "pytest-999.0-py3-none-any.whl"):
        (dest / name).write_bytes(b"")
    chosen, why = gw.select(dest)
    names = sorted(p.name for p in chosen)
    assert names == ["megatron_core-0.0.1-py3-none-any.whl",
                     "no_such_dist_xyz-1.0-py3-none-any.whl", "pytest-999.0-py3-none-any.whl"]
    assert why["no-such-dist-xyz"] == "1.0 (missing)" and "pinned" in why["megatron-core"]
    # no wheels: only dice_ds is laid out, with patches/ as dice_ds.patches (what pip would do)
    target = tmp_path / "site"
    assert gw.install(tmp_path / "none", target, target / "installed.json") == 0
    assert (target / "dice_ds" / "patches" / "megatron_cpu.py").is_file()
    assert (target / "dice_ds" / "assets" / "digits_dit_moe.pt").is_file()
    assert json.loads((target / "installed.json").read_text())["wheels"] == {}
