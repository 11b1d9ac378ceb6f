"""``dice-ds plan`` on a two-level fabric (dice_ds/plan/fabric.py): the link each group kind sees
in a rank layout, the two arrangements compared per mode, and the pick."""
import json
import subprocess
import sys

import pytest

from dice_ds.bench.arrangements import arrangements, node_sizes
from dice_ds.config import get_flavor
from dice_ds.parallel.dims import ParallelDims
from dice_ds.plan.costs import costs_from_flops
from dice_ds.plan.fabric import Fabric, kind_link, predict_layouts
from dice_ds.plan.presets import Link
from dice_ds.workload import Workload

FAST, SLOW = Link("fast", 1e9, 1e-5), Link("slow", 1e7, 1e-4, 65536)


def _fabric(k=2, m=2, per_rank=False):
    return Fabric(FAST, SLOW, k, m, per_rank)


def test_a_group_inside_a_node_sees_the_intra_link():
    fab = _fabric()
    assert kind_link(fab, [[0, 1], [2, 3]], fab.hosts()) is FAST


def test_a_crossing_group_shares_the_node_link():
    """2 x 2, EP groups [0,2] [1,3]: every byte off-node, the node's 2 ranks share its link."""
    fab = _fabric()
    lk = kind_link(fab, [[0, 2], [1, 3]], fab.hosts())
    assert lk.bandwidth == pytest.approx(SLOW.bandwidth / 2)
    assert lk.latency == SLOW.latency and lk.hol_bytes == SLOW.hol_bytes
    per_rank = kind_link(_fabric(per_rank=True), [[0, 2], [1, 3]], fab.hosts())
    assert per_rank.bandwidth == pytest.approx(SLOW.bandwidth)
    # one group of 4 over 2 nodes: 2 of 3 peers off-node, 2 ranks per node link
    whole = kind_link(fab, [[0, 1, 2, 3]], fab.hosts())
    assert whole.bandwidth == pytest.approx(1 / max((1 / 3) / FAST.bandwidth,
                                                    2 * (2 / 3) / SLOW.bandwidth))


def test_arrangements_per_mode():
    hosts = _fabric().hosts()
    assert arrangements(ParallelDims(4, 2), hosts) == {"inside": "ep-inner", "across": "dp-inner"}
    assert arrangements(ParallelDims(4, 1, 2), hosts) == {"inside": "ep-inner",
                                                          "across": "dp-inner"}
    assert arrangements(ParallelDims(4, 2, 2), hosts) == {"inside": "ep-inner",
                                                          "across": "sp-inner"}
    assert arrangements(ParallelDims(4), hosts) == {"inside": "ep-inner"}
    eight = _fabric(4).hosts()
    assert arrangements(ParallelDims(8, 4, 2), eight) == {"inside": "ep-inner",
                                                          "across": "sp-inner"}
    with pytest.raises(ValueError, match="--ranks-per-node 3"):
        node_sizes("sync", 3, 2, 8)


def test_the_plan_picks_ep_inside_nodes_when_the_network_is_slow():
    w = Workload(get_flavor("DiT-S/2"), images_per_rank=2, steps=4, dtype="fp32")
    costs = costs_from_flops(w, 1e12)
    rows = predict_layouts("sync", w, costs, _fabric())
    assert [r["arrangement"] for r in rows] == ["inside", "across"]
    inside, across = rows
    assert inside["picked"] and not across["picked"] and across["vs_picked"] > 1.5
    assert inside["crossing_nodes"]["ep"] == 0 and across["crossing_nodes"]["ep"] == 2
    assert inside["ep"] == 2 and inside["ep_link"] == "fast" and across["ep_link"] == "fast + slow"
    # with a fabric as fast between nodes as inside them the two layouts cost the same
    same = predict_layouts("sync", w, costs, Fabric(FAST, FAST, 2, 2, True))
    assert same[0]["batch_seconds"] == pytest.approx(same[1]["batch_seconds"])


def test_plan_cli_two_level(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dice_ds.cli", "plan", "--models", "DiT-S/2",
                        "--gpus", "4", "--scenarios", "a100:pcie4", "--ranks-per-node", "2",
                        "--intra-link", "10gbit", "--inter-link", "100mbit", "--modes",
                        "dp,sync,hybrid", "--steps", "4", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "sync: picks ep-inner (inside), dp-inner predicted" in r.stdout
    rows = json.loads((tmp_path / "plan.json").read_text())["layouts"]
    assert {(x["mode"], x["layout"]) for x in rows} == {
        ("dp", "ep-inner"), ("sync", "ep-inner"), ("sync", "dp-inner"), ("hybrid", "ep-inner"),
        ("hybrid", "sp-inner")}
    bad = subprocess.run([sys.executable, "-m", "dice_ds.cli", "plan", "--gpus", "6",
                          "--ranks-per-node", "4", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "whole nodes of 4" in bad.stderr
