"""``dice-ds bench --nodes`` without namespaces: each run's settings (group sizes of one node,
the rank layout of its arrangement) and ``dice-ds plan --validate`` of a node bench
(dice_ds/plan/validate_nodes.py) on a synthetic bench whose calibration is the committed 2-rank
bench docs/bench_ranks_n2.json (same job)."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from dice_ds.bench.jobs import job_of
from dice_ds.bench.node_bench import expected_order, node_run_settings
from dice_ds.options import ep_size_of, sp_size_of
from dice_ds.plan.validate import load
from dice_ds.plan.validate_nodes import validate_nodes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAL = os.path.join(ROOT, "docs", "bench_ranks_n2.json")


def _args(nodes=2, k=2):
    a = argparse.Namespace(model="DiT-S/2", image_size=128, steps=10, batch=1, ckpt=None,
                           extra=[], nodes=nodes, ranks_per_node=k, ranks=nodes * k, custom={})
    a.job = job_of(a)
    return a


@pytest.mark.parametrize("mode, arrangement, sizes, layout, order", [
    ("dp", "across", (1, 1), "auto", "ep-inner"),
    ("sync", "inside", (2, 1), "auto", "ep-inner"),
    ("sync", "across", (2, 1), "dp-inner", "dp-inner"),
    ("sp", "across", (1, 2), "dp-inner", "dp-inner"),
    ("hybrid", "across", (2, 2), "sp-inner", "sp-inner"),
])
def test_each_run_has_groups_of_a_node_in_its_layout(mode, arrangement, sizes, layout, order):
    a = _args()
    s = node_run_settings(a, a.job, mode, arrangement)
    assert (ep_size_of(s, 4), sp_size_of(s, 4)) == sizes and s.rank_layout == layout
    assert expected_order(a, a.job, mode, arrangement) == order


def test_validation_of_a_node_bench_from_a_two_rank_calibration(tmp_path):
    cal = load(CAL)
    meta = {k: v for k, v in cal["meta"].items() if k in ("settings", "job", "cpus", "command")}
    meta.update(ranks=4, nodes=2, ranks_per_node=2, arrangements={
        "100mbit inside": {"dp": "ep-inner", "sync": "ep-inner"},
        "100mbit across": {"dp": "ep-inner", "sync": "dp-inner"}})
    rows = [{"link": f"100mbit {arr}", "mode": m, "runs": 1, "seconds": t, "speedup": None}
            for arr, times in (("inside", (7.0, 8.0)), ("across", (7.0, 12.0)))
            for m, t in zip(("dp", "sync"), times)]
    bench = {"meta": meta, "rows": rows, "runs": []}
    got = {(r["link"], r["mode"]): r for r in validate_nodes(bench, calib=cal)}
    inside, across = got["100mbit inside", "sync"], got["100mbit across", "sync"]
    assert inside["layout"] == "ep-inner" and across["layout"] == "dp-inner"
    assert inside["picked"] and inside["measured_faster"] and not across["picked"]
    assert across["predicted"] > inside["predicted"] and across["crossing_nodes"]["ep"] == 2
    assert got["100mbit inside", "dp"]["speedup_predicted"] > 0
    with pytest.raises(ValueError, match="--calibration"):
        validate_nodes(bench)
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(bench))
    r = subprocess.run([sys.executable, "-m", "dice_ds.cli", "plan", "--models", "",
                        "--validate", str(path), "--calibration", CAL, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "- 100mbit, sync: plan picks ep-inner (inside" in r.stdout and "agrees" in r.stdout
