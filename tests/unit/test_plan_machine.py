"""dice-ds plan names a calibration from another machine (dice_ds/plan/machine.py): a different CPU
model or core count in the bench JSONs' meta.machine, a bench that recorded none, and a DP row
predicted from the calibration that disagrees with the measured one."""
import copy
import json
import os

from dice_ds.bench.probe import machine
from dice_ds.cli import main
from dice_ds.plan.machine import compute_disagreement, differences, notes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = {"cpu_model": "Test CPU 9000", "cores": 2}


def _bench(m):
    return {"meta": {"machine": m} if m is not None else {}}


def test_this_machine_is_recorded():
    m = machine()
    assert m["cores"] >= 1 and set(m) == {"cpu_model", "cores"}


def test_differences_name_cpu_cores_and_a_missing_record():
    assert differences(_bench(HERE), dict(HERE)) == []
    other = differences(_bench({"cpu_model": "Big CPU", "cores": 64}), HERE)
    assert other == ["CPU 'Big CPU', not 'Test CPU 9000'", "64 cores, not 2"]
    assert "records no machine" in differences(_bench(None), HERE)[0]
    assert differences(_bench(HERE), None) == []  # the target is unknown: nothing to compare


def test_compute_disagreement_only_beyond_the_tolerance():
    rows = [{"link": "100mbit", "mode": "dp", "predicted": 10.0, "measured": 8.0,
             "error_pct": 25.0, "calibration": False},
            {"link": "300mbit", "mode": "dp", "predicted": 10.0, "measured": 9.5,
             "error_pct": 5.3, "calibration": False},
            {"link": "50mbit", "mode": "dp", "predicted": 10.0, "measured": 5.0,
             "error_pct": 100.0, "calibration": True},   # fitted on itself: not a probe
            {"link": "100mbit", "mode": "sync", "predicted": 20.0, "measured": 10.0,
             "error_pct": 100.0, "calibration": False}]
    got = compute_disagreement(rows)
    assert len(got) == 1 and "DP on 100mbit" in got[0] and "+25 %" in got[0]
    lines = notes({"--calibration": _bench({"cpu_model": "x", "cores": 2})}, HERE, rows)
    assert lines[0].startswith("--calibration ran on another machine: CPU 'x'")
    assert len(lines) == 2


def test_plan_validate_names_a_calibration_from_another_machine(tmp_path, capsys):
    bench = json.load(open(os.path.join(ROOT, "docs", "bench_ranks_n4.json")))
    cal = json.load(open(os.path.join(ROOT, "docs", "bench_ranks_n2.json")))
    bench = copy.deepcopy(bench)
    bench["meta"]["machine"] = HERE
    cal["meta"]["machine"] = {"cpu_model": "Another CPU", "cores": 32}
    bp, cp = tmp_path / "n4.json", tmp_path / "cal.json"
    bp.write_text(json.dumps(bench))
    cp.write_text(json.dumps(cal))
    loads = os.path.join(ROOT, "docs", "bench_ranks_n4.loads.json")
    (tmp_path / "n4.loads.json").write_text(open(loads).read())
    out = tmp_path / "plan"
    assert main(["plan", "--models", "", "--validate", str(bp), "--calibration", str(cp),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: --calibration ran on another machine: CPU 'Another CPU'" in err
    assert "32 cores, not 2" in err
    assert "### Calibration" in (out / "plan.md").read_text()
    # the same machine: no machine note
    cal["meta"]["machine"] = HERE
    cp.write_text(json.dumps(cal))
    assert main(["plan", "--models", "", "--validate", str(bp), "--calibration", str(cp),
                 "--out", str(out)]) == 0
    assert "another machine" not in capsys.readouterr().err
