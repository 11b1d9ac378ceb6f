"""``dice-ds bench --nodes 2 --ranks-per-node 2`` end to end on emulated nodes (tiny job, one round):
every mode in both arrangements, each run in the layout expected (``inside``: the run's own
``--rank-layout auto``), the rows a ``dice-ds plan --validate`` reads, and every namespace the
bench made removed. About 2 minutes on 2 cores: ``DICE_DS_CLUSTER_FULL=1``."""
import json
import os
import subprocess
import sys

import pytest

from dice_ds.bench.links import available

pytestmark = [
    pytest.mark.skipif(available() is not None, reason=f"emulated nodes: {available()}"),
    pytest.mark.skipif(os.environ.get("DICE_DS_CLUSTER_FULL") != "1",
                       reason="the node bench (about 2 minutes): DICE_DS_CLUSTER_FULL=1"),
]


def test_node_bench_runs_every_mode_in_both_layouts(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, "-m", "dice_ds.cli", "bench", "--nodes", "2",
                             "--ranks-per-node", "2", "--links", "100mbit", "--modes",
                             "dp,sync,hybrid", "--rounds", "1", "--model", "debug",
                             "--image-size", "32", "--steps", "2", "--batch", "1", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    stdout, stderr = proc.communicate(timeout=500)
    assert proc.returncode == 0, stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["nodes"] == 2 and data["meta"]["ranks"] == 4
    assert data["meta"]["arrangements"] == {
        "100mbit inside": {"dp": "ep-inner", "sync": "ep-inner", "hybrid": "ep-inner"},
        "100mbit across": {"dp": "ep-inner", "sync": "dp-inner", "hybrid": "sp-inner"}}
    assert all(r["ok"] for r in data["runs"]), [r.get("why") for r in data["runs"]]
    assert {(r["link"], r["mode"]) for r in data["rows"] if r["runs"] == 1} == {
        (f"100mbit {a}", m) for a in ("inside", "across") for m in ("dp", "sync", "hybrid")}
    info = json.loads((out / "100mbit" / "inside" / "sync" / "r0" / "samples" / "run.json")
                      .read_text())
    assert info["layout"]["why"].startswith("auto: 2 hosts")
    assert info["layout"]["hosts"] == ["dds-node0", "dds-node0", "dds-node1", "dds-node1"]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"p{proc.pid}" not in left
