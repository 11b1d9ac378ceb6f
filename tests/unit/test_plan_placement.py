"""dice-ds plan predicts an expert placement (dice_ds/plan/placement.py): the ranks' loads from the
rows per expert packed by the placement, and the memory of its replica slots."""
import json

import pytest

from dice_ds.config import get_flavor
from dice_ds.placement import contiguous, imbalance, rank_rows
from dice_ds.plan.costs import costs_from_flops
from dice_ds.plan.placement import expert_rows_of, placed_loads, remote_share
from dice_ds.plan.predict import predict
from dice_ds.plan.presets import LINKS
from dice_ds.workload import Workload

# 2 layers, 8 experts; layer 0 has one hot expert (4x), layer 1 is uniform
ROWS = [[400.0] + [100.0] * 7, [100.0] * 8]


def test_balanced_loads_lower_the_busiest_rank_and_keep_the_mean():
    loads, placement = placed_loads(ROWS, 4, "balanced", replicas=1)
    assert placement.replicas == 1
    for l in (0, 1):
        got = loads(3, l)
        assert sum(got) / len(got) == pytest.approx(1.0)
    # contiguous: ranks hold experts (0, 1), (2, 3), ...: layer 0's busiest rank has 500 of 275
    assert max(loads(0, 0)) == pytest.approx(imbalance(rank_rows(placement, ROWS)[0]))
    assert max(loads(0, 0)) < 500 / 275
    assert loads(7, 1) == pytest.approx([1.0] * 4)


def test_a_placement_file_is_read_and_checked(tmp_path):
    path = tmp_path / "p.json"
    contiguous(8, 4, 2).write(str(path))
    loads, _ = placed_loads(ROWS, 4, str(path))
    assert max(loads(0, 0)) == pytest.approx(500 / 275)
    with pytest.raises(Exception, match="EP size 4"):
        placed_loads(ROWS, 2, str(path))


def test_expert_rows_come_from_run_json_or_the_sidecar(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"expert_placement": {"expert_rows": ROWS}}))
    assert expert_rows_of(run, None, "100mbit") == ROWS
    side = tmp_path / "b.loads.json"
    side.write_text(json.dumps({"100mbit": {}, "expert_rows": {"100mbit": ROWS}}))
    assert expert_rows_of(tmp_path / "gone.json", side, "100mbit") == ROWS
    assert expert_rows_of(None, side, "300mbit") is None


def test_a_placement_wins_back_a_hot_expert_and_its_replicas_cost_memory():
    cfg = get_flavor("DiT-S/2")
    w = Workload(cfg, images_per_rank=1, cfg_guidance=True, steps=10, dtype="fp32")
    costs = costs_from_flops(w, 50e9)
    rows = [[800.0] + [100.0] * 7 for _ in range(cfg.depth)]
    contig = [x / 375.0 for x in (900.0, 200.0, 200.0, 200.0)]
    skewed = predict("sync", w, costs, LINKS["loopback"], 4, lambda i, l: contig)
    bal, _ = placed_loads(rows, 4, "balanced", replicas=1)
    placed = predict("sync", w, costs, LINKS["loopback"], 4, bal,
                     settings={"ep": True, "expert_placement": "balanced", "expert_replicas": 1})
    assert skewed["batch_seconds"] > placed["batch_seconds"]
    assert placed["memory"]["expert_weights"] > skewed["memory"]["expert_weights"]


def test_replicas_keep_rows_local():
    assert remote_share(contiguous(8, 4, 2), ROWS) == pytest.approx(3 / 4)
    _, placement = placed_loads(ROWS, 4, "balanced", replicas=1)
    assert remote_share(placement, ROWS) < 3 / 4


def test_validation_predicts_the_committed_placed_bench_from_its_sidecar():
    """docs/bench_placement_n4.json: sync and interweaved EP with a balanced placement (one
    replica slot per rank) as --mode-config modes; their rows per expert come from the sidecar
    (the run directories are gone)."""
    import os

    from dice_ds.plan.validate import load, validate

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    docs = os.path.join(root, "docs")
    rows = {r["mode"]: r for r in validate(load(os.path.join(docs, "bench_placement_n4.json")),
                                           calib=load(os.path.join(docs,
                                                                   "bench_nodes_cal.json")))}
    assert "error" not in rows["sync-bal"] and "error" not in rows["iw-bal"]
    assert rows["sync-bal"]["bytes_predicted"] < 0.7 * rows["sync"]["bytes_predicted"]
    assert rows["sync-bal"]["predicted"] < rows["sync"]["predicted"]
    assert abs(rows["sync-bal"]["bytes_predicted"] - rows["sync-bal"]["bytes_measured"]) < (
        0.1 * rows["sync-bal"]["bytes_measured"])
