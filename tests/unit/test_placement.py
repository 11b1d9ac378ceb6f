"""Expert placement as data (dice_ds/placement.py): the balanced algorithm on measured
routing rows, the JSON file, the checks of the settings, and the logical -> physical routing."""
import json
import os

import pytest
import torch

from dice_ds.config import ConfigError
from dice_ds.placement import (
    BALANCED,
    Placement,
    SlotRouting,
    balanced,
    contiguous,
    imbalance,
    placement_setting,
    rank_rows,
    rows_from_loads,
    run_record,
)

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


def _measured(link: str = "100mbit") -> tuple[dict, list[list[float]]]:
    """The committed 8-rank routing rows (DiT-S/2 job, E = 8: one expert per rank, so the rows
    per rank are the rows per expert), per (step, layer) and summed per layer."""
    with open(os.path.join(DOCS, "bench_ranks_n8.loads.json")) as fh:
        loads = json.load(fh)[link]
    return loads, rows_from_loads(loads)


def test_measured_rows_are_unbalanced_under_the_contiguous_placement():
    _, rows = _measured()
    worst = max(imbalance(r) for r in rank_rows(contiguous(8, 8, len(rows)), rows))
    assert worst > 3.5  # the issue: the busiest expert gets 2.4-4.0x the mean


@pytest.mark.parametrize("link", ["100mbit", "300mbit"])
def test_balanced_placement_brings_the_busiest_rank_near_the_mean(link):
    loads, rows = _measured(link)
    placement = balanced(rows, 8, replicas=2)
    assert placement.slots_per_rank == 3 and placement.num_physical == 24
    assert max(imbalance(r) for r in rank_rows(placement, rows)) <= 1.25
    # the pattern is stable across steps: the placement of the summed rows holds per step too
    per_step = [imbalance(rank_rows(placement, [v if i == int(k.split(",")[1]) else [1.0] * 8
                                                for i in range(len(rows))])[int(k.split(",")[1])])
                for k, v in loads.items()]
    assert sorted(per_step)[len(per_step) // 2] <= 1.25
    # one replica per rank already halves the worst layer; none can only permute (E = W here)
    one = max(imbalance(r) for r in rank_rows(balanced(rows, 8, replicas=1), rows))
    assert one <= 1.4
    none = [imbalance(r) for r in rank_rows(balanced(rows, 8, replicas=0), rows)]
    assert none == [imbalance(r) for r in rank_rows(contiguous(8, 8, len(rows)), rows)]


def test_permutation_balances_when_experts_outnumber_ranks():
    rows = [[100, 90, 10, 5, 80, 70, 3, 2]]  # contiguous on 4 ranks: 190, 15, 150, 5
    placed = balanced(rows, 4, replicas=0)
    assert imbalance(rank_rows(contiguous(8, 4, 1), rows)[0]) > 2.0
    assert imbalance(rank_rows(placed, rows)[0]) < 1.25
    assert sorted(e for rank in placed.layers[0] for e in rank) == list(range(8))


def test_every_layer_holds_every_expert_on_equal_slot_counts():
    _, rows = _measured()
    placement = balanced(rows, 8, replicas=3)
    placement.validate(num_experts=8, ep_size=8, depth=len(rows))
    for ranks in placement.layers:
        assert all(len(set(r)) == len(r) == 4 for r in ranks)  # no expert twice on a rank


def test_placement_file_round_trips_and_is_validated(tmp_path):
    _, rows = _measured()
    placement = balanced(rows, 8, replicas=1, source="docs/bench_ranks_n8.loads.json")
    path = str(tmp_path / "p.json")
    placement.write(path)
    back = Placement.read(path)
    assert back == placement and back.rows == placement.rows and back.source == placement.source
    assert json.load(open(path))["imbalance"][0] == pytest.approx(
        imbalance(rank_rows(placement, rows)[0]), abs=1e-3)
    with pytest.raises(ConfigError, match="for E=8, EP size 8, 12 layers but the run has E=8, "
                                          "EP size 4"):
        back.validate(num_experts=8, ep_size=4, depth=12)
    uneven = Placement(4, 2, (((0, 1), (2, 3, 0)),))
    with pytest.raises(ConfigError, match="every rank of every layer must hold"):
        uneven.validate(num_experts=4, ep_size=2, depth=1)
    lost = Placement(4, 2, (((0, 1), (2, 1)),))
    with pytest.raises(ConfigError, match=r"places no slot of experts \[3\]"):
        lost.validate(num_experts=4, ep_size=2, depth=1)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ConfigError, match="not a placement file"):
        Placement.read(str(tmp_path / "bad.json"))


def test_settings_are_checked_in_one_line(tmp_path):
    kw = dict(num_experts=4, ep_size=2, depth=2)
    assert placement_setting("contiguous", 0, **kw) is None
    assert placement_setting("balanced", 2, **kw) == BALANCED
    with pytest.raises(ConfigError, match="--expert-replicas 1 needs --expert-placement balanced"):
        placement_setting("contiguous", 1, **kw)
    with pytest.raises(ConfigError, match="add --ep"):
        placement_setting("balanced", 0, num_experts=4, ep_size=1, depth=2)
    with pytest.raises(ConfigError, match=r"moe.replicas 3 \(--expert-replicas\): use 0..2"):
        placement_setting("balanced", 3, **kw)
    with pytest.raises(ConfigError, match="cannot read it"):
        placement_setting(str(tmp_path / "missing.json"), 0, **kw)
    path = str(tmp_path / "c.json")
    contiguous(4, 2, 2).write(path)
    assert placement_setting(path, 0, **kw) is None  # a contiguous file: the default path
    for msg in (str(e) for e in _errors(path)):
        assert "\n" not in msg


def _errors(path):
    out = []
    for args in (("contiguous", 1), ("balanced", 9), (path, 1)):
        try:
            placement_setting(*args, num_experts=4, ep_size=2, depth=2)
        except ConfigError as e:
            out.append(e)
    assert len(out) == 3
    return out


def test_slot_routing_keeps_local_tokens_and_spreads_the_rest():
    # 2 ranks of 3 slots: expert 0 on both ranks, expert 3 on rank 0 only
    slots = (0, 1, 3, 2, 0, 1)
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(10, 4, generator=g)
    top = probs.topk(2, dim=1).indices
    rmap = torch.zeros(10, 4, dtype=torch.bool).scatter_(1, top, True)
    for rank in (0, 1):
        sr = SlotRouting(slots, 3, rank)
        p_TP, m_TP = sr.route(probs, rmap)
        assert m_TP.shape == (10, 6) and (m_TP.sum(1) == 2).all()
        t, p = m_TP.nonzero(as_tuple=True)
        experts = torch.tensor(slots)[p]
        assert torch.equal(rmap[t, experts], torch.ones_like(t, dtype=torch.bool))
        assert torch.equal(p_TP[t, p], probs[t, experts])
        # replicated experts 0 and 1 stay on this rank; expert 3 (rank 0) / 2 (rank 1) remote
        for e in (0, 1):
            assert ((p[experts == e] // 3) == rank).all()
        rows = sr.row_experts(m_TP)
        assert torch.equal(rows, torch.repeat_interleave(torch.tensor(slots), m_TP.sum(0)))


def test_tokens_of_a_rank_without_a_replica_spread_over_all_replicas():
    # expert 0 on ranks 1 and 2 (4 ranks of 2 slots); rank 0 holds none of its replicas
    slots = (1, 2, 0, 3, 0, 1, 2, 3)
    sr = SlotRouting(slots, 2, 0)
    rmap = torch.zeros(8, 4, dtype=torch.bool)
    rmap[:, 0] = True
    rmap[:, 3] = True
    _, m_TP = sr.route(torch.rand(8, 4), rmap)
    assert m_TP[:, 2].sum() == 4 and m_TP[:, 4].sum() == 4  # expert 0: half each
    assert m_TP[:, 3].sum() == 4 and m_TP[:, 7].sum() == 4


def test_identity_routing_is_untouched():
    sr = SlotRouting((0, 1, 2, 3), 2, 1)
    probs, rmap = torch.rand(5, 4), torch.rand(5, 4) > 0.5
    p, m = sr.route(probs, rmap)
    assert p is probs and m is rmap


def test_run_record_counts_rows_per_ep_rank():
    placement = Placement(4, 2, (((0, 1, 3), (2, 3, 1)),))
    per_rank = [{"expert_rows": [[5, 3, 2, 10]], "slot_rows": [[5, 3, 4, 2, 6, 0]]},
                {"expert_rows": [[1, 1, 2, 2]], "slot_rows": [[1, 1, 0, 2, 2, 0]]}]
    rec = run_record(placement, 2, per_rank)
    assert rec["expert_rows"] == [[6, 4, 4, 12]]
    assert rec["ep_rank_rows"] == [[14, 12]]
    assert rec["imbalance"] == [round(14 / 13, 4)] and rec["imbalance_max"] == rec["imbalance"][0]
    assert run_record(None, 2, per_rank)["placement"] == "contiguous"


def test_bench_report_has_the_busiest_rank_over_the_mean_per_mode():
    from dice_ds.bench import report
    from dice_ds.bench.launch import expert_balance_of

    def rec(mode, secs, balance):
        return {"ok": True, "link": "L", "mode": mode, "round": 0, "sampling_seconds": secs,
                "phase_seconds": [{}], "bytes_remote": [100, 100], "cache_peak_bytes": [0],
                "latents": "/nonexistent", "exchanges": [10, 10], "expert_balance": balance}

    placed = Placement(4, 2, (((0, 1, 3), (2, 3, 1)),), source="calibration")
    record = run_record(placed, 2, [{"expert_rows": [[5, 3, 2, 10]],
                                     "slot_rows": [[5, 3, 3, 2, 7, 0]]}])
    runs = [rec("sync", 12.0, expert_balance_of(run_record(None, 2, [
                {"expert_rows": [[5, 3, 2, 10]], "slot_rows": [[5, 3, 2, 10]]}]))),
            rec("sync-balanced", 10.0, expert_balance_of(record))]
    rows = {r["mode"]: r for r in report.summarise(runs, {"L": {"ok": True, "seconds": 8.0}})}
    assert rows["sync"]["expert_imbalance_max"] == pytest.approx(12 / 10)
    assert rows["sync-balanced"]["expert_imbalance_max"] == pytest.approx(11 / 10)  # 11 | 9
    assert rows["sync-balanced"]["expert_placement"] == "3 slots/rank (calibration)"
    table = "\n".join(report.balance_table(list(rows.values()), "L"))
    assert "| sync | contiguous | 1.20x | 1.20x |" in table
    assert "| sync-balanced | 3 slots/rank (calibration) | 1.10x | 1.10x |" in table


def test_placement_command_writes_a_file_a_run_accepts(tmp_path, capsys):
    from dice_ds.cli import main

    out = tmp_path / "p8.json"
    loads = os.path.join(DOCS, "bench_ranks_n8.loads.json")
    assert main(["placement", "--rows", loads, "--link", "300mbit", "--replicas", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "worst layer 3.98 -> 1.17" in printed and printed.count("busiest rank / mean") == 12
    placement = Placement.read(str(out))
    assert placement.slots_per_rank == 3 and placement.source.endswith("[300mbit]")
    assert placement_setting(str(out), 0, num_experts=8, ep_size=8, depth=12) == placement
    # a run.json's routing rows (run_record), placed on another EP size
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"ep_size": 2, "expert_placement": run_record(None, 2, [
        {"expert_rows": [[9, 1, 1, 1], [4, 4, 2, 2]], "slot_rows": [[9, 1, 1, 1], [4, 4, 2, 2]]}])}))
    assert main(["placement", "--rows", str(run), "--out", str(out)]) == 0
    assert Placement.read(str(out)).layers[1] == ((0, 2), (1, 3))
    assert main(["placement", "--rows", str(run), "--link", "x", "--out", str(out),
                 "--ep-size", "3"]) == 2
    assert "E=4 is not divisible by the EP size 3" in capsys.readouterr().err


def test_balanced_is_a_valid_placement_for_any_rows_and_budget():
    import random

    rng = random.Random(0)
    for _ in range(40):
        w = rng.choice([2, 4, 8])
        e = w * rng.choice([1, 2, 4])
        r = rng.randint(0, e - e // w)
        rows = [[rng.choice([0, 0, 1, 50, 500]) * rng.random() for _ in range(e)] for _ in range(2)]
        placement = balanced(rows, w, r).validate(num_experts=e, ep_size=w, depth=2)
        assert placement.replicas == r
        for ranks in placement.layers:
            assert all(len(set(x)) == len(x) for x in ranks), (w, e, r, ranks)
        # never worse than megatron's contiguous placement
        for got, base in zip(rank_rows(placement, rows), rank_rows(contiguous(e, w, 2), rows)):
            assert max(got) <= max(base) + 1e-9


@pytest.mark.parametrize("sampler", ["rf", "ddpm"])
def test_calibration_counts_the_rows_of_a_short_trajectory(sampler):
    """The start-up calibration (dice_ds/pipeline/calibrate.py) routes the job's first batch
    through ``CALIBRATION_STEPS`` denoising steps of its sampler (DDPM runs as DDIM: no noise
    draws), not one forward: every call's rows are counted."""
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.options import from_overrides
    from dice_ds.pipeline.calibrate import CALIBRATION_STEPS, balanced_placement, calibration_rows

    cfg = get_flavor("debug")
    model = init_weights(build_model(cfg), "random", seed=3)
    opts = from_overrides({"model": "debug", "sampler": sampler, "num_sampling_steps": 10,
                           "per_proc_batch_size": 2, "cfg_scale": 1.5, "global_seed": 0,
                           "init": "random"})
    rows = calibration_rows(model, opts, rank=0, world=1)
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    per_forward = 2 * 2 * tokens * cfg.top_k  # 2 samples, CFG doubles them, top-k slots each
    assert [sum(layer) for layer in rows] == [CALIBRATION_STEPS * per_forward] * cfg.depth
    first = calibration_rows(model, from_overrides({"num_sampling_steps": 1}, base=opts), 0, 1)
    assert [sum(layer) for layer in first] == [per_forward] * cfg.depth
    placement = balanced_placement(model, opts, ep_size=2, rank=0, world=1)
    assert placement.source.startswith(f"start-up calibration: {CALIBRATION_STEPS} ")
