"""Without matplotlib (the runtime install of ``bash scripts/run_main.sh``), ``dice-ds bench`` and
``dice-ds plan`` still write their tables and say in one line why there is no PNG and how to get one."""
import json
import sys

import pytest


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError


def _hint_lines(err: str, prog: str, png: str) -> list[str]:
    lines = [ln for ln in err.splitlines() if "matplotlib" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: matplotlib is not installed, so no {png}: ")
    assert f"{sys.executable} -m pip install 'dice_ds[bench]'" in lines[0]
    assert "bash scripts/setup.sh bench" in lines[0]
    return lines


def test_bench_report_without_matplotlib(tmp_path, no_matplotlib, capsys):
    from dice_ds.bench.cli import main

    rec = {"ok": True, "link": "loopback", "round": 0, "sampling_seconds": 2.0,
           "phase_seconds": [{}], "bytes_remote": [0, 0], "cache_peak_bytes": [0],
           "latents": "/nonexistent", "exchanges": [0, 0]}
    runs = [dict(rec, mode="dp"), dict(rec, mode="sync", sampling_seconds=3.0)]
    meta = {"command": "dice-ds bench", "date": "d", "commit": "c", "cpus": 2, "load_min": 0.0,
            "load_max": 0.0, "job": "j", "shaping": {}, "probes": {}, "unavailable": {},
            "rounds": 1, "wall_seconds": 1.0}
    (tmp_path / "bench.json").write_text(json.dumps({"meta": meta, "runs": runs}))
    assert main(["--rerender", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    _hint_lines(err, "dice-ds bench", "bench.png")
    assert f"results in {tmp_path} (bench.json, bench.md)" in err
    assert (tmp_path / "bench.md").is_file() and not (tmp_path / "bench.png").exists()


def test_plan_report_without_matplotlib(tmp_path, no_matplotlib, capsys):
    from dice_ds.plan.cli import main

    out = tmp_path / "plan"
    assert main(["--models", "DiT-XL/2", "--gpus", "8", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    _hint_lines(captured.err, "dice-ds plan", "plan.png")
    assert "matplotlib" not in captured.out  # the tables on stdout stay tables
    assert f"results in {out} (plan.md, plan.json)" in captured.err
    assert (out / "plan.md").is_file() and not (out / "plan.png").exists()
