"""Table tests of the DICE schedule rules in dice_ds.schedule (spec §2.2.3, §2.3, §2.4, §2.5)."""
import json

import pytest

from dice_ds.parallel.plan import ParallelPlan
from dice_ds.schedule import (Schedule, async_layer_indices, is_skip_step, ring_predecessor,
                              step_skips, sync_steps)

# spec §2.3 (S = 50), with dice_ds's cool-down fix in row 4 (pitfall 4)
SYNC_TABLE = [
    ((0, 0, 0), {50}),
    ((3, 0, 0), {50, 49, 48, 47}),
    ((0, 5, 0), set(range(5, 51, 5))),
    ((0, 0, 4), {50, 4, 3, 2, 1}),
    ((2, 0, 4), {50, 49, 48, 4, 3, 2, 1}),
    ((0, 10, 3), {50, 40, 30, 20, 10, 3, 2, 1}),
]


@pytest.mark.parametrize("knobs,expected", SYNC_TABLE)
def test_sync_steps_table(knobs, expected):
    warmup, strided, cooldown = knobs
    assert sync_steps(50, warmup=warmup, cooldown=cooldown, strided=strided) == frozenset(expected)


def test_sync_steps_edges():
    assert sync_steps(1) == {1}
    assert sync_steps(10, warmup=100) == frozenset(range(1, 11))  # warm-up clamps to S steps
    assert sync_steps(10, cooldown=100) == frozenset(range(1, 11))
    assert sync_steps(7, strided=3) == {7, 6, 3}  # the first step is sync even if 3 does not divide it
    with pytest.raises(ValueError, match="num_steps"):
        sync_steps(0)
    with pytest.raises(ValueError, match="cooldown"):
        sync_steps(10, cooldown=-1)


def test_async_layer_indices_named():
    assert async_layer_indices("all", 8) == tuple(range(8))
    assert async_layer_indices("shallow", 28) == tuple(range(14))
    assert async_layer_indices("deep", 28) == tuple(range(14, 28))
    assert async_layer_indices("interleaved", 8) == (0, 2, 4, 6)
    assert async_layer_indices("shallow", 40) == tuple(range(20))  # G
    assert async_layer_indices("shallow", 2) == (0,)                # debug flavor
    assert async_layer_indices("deep", 3) == (1, 2)


def test_async_layer_indices_explicit():
    assert async_layer_indices((5, 1, 3), 8) == (1, 3, 5)
    assert async_layer_indices([0], 2) == (0,)
    for bad, msg in (((), "empty"), ((8,), "outside"), ((-1,), "outside"), ((1, 1), "duplicate")):
        with pytest.raises(ValueError, match=msg):
            async_layer_indices(bad, 8)
    with pytest.raises(ValueError, match="use one of"):
        async_layer_indices("middle", 8)
    with pytest.raises(ValueError, match="selects no layer"):
        async_layer_indices("shallow", 1)


def _spec_past(mode, layer, depth):
    """past(l) exactly as spec §2.2.3 tabulates it."""
    half = depth // 2
    return {"all": (layer - 1) % depth,
            "shallow": (layer - 1) % half,
            "deep": ((layer - 1) % half) + half,
            "interleaved": (layer - 2) % depth}[mode]


@pytest.mark.parametrize("depth", [8, 28, 40])
@pytest.mark.parametrize("mode", ["all", "shallow", "deep", "interleaved"])
def test_ring_predecessor_matches_spec(mode, depth):
    ring = async_layer_indices(mode, depth)
    for layer in ring:
        assert ring_predecessor(layer, ring) == _spec_past(mode, layer, depth), (mode, layer)


def test_ring_predecessor_explicit_and_errors():
    assert [ring_predecessor(layer, (1, 4, 6)) for layer in (1, 4, 6)] == [6, 1, 4]
    assert ring_predecessor(3, (3,)) == 3
    with pytest.raises(ValueError, match="not an async layer"):
        ring_predecessor(2, (1, 4, 6))


def test_ep_stale():
    plan = ParallelPlan(ep_size=2, mode="interweaved", async_layers="shallow", warmup=1, cooldown=2)
    S, L = 10, 4

    def stale(p, i, layer):
        return Schedule.build(p, S, L).ep_stale(i, layer)

    table = {(i, layer): stale(plan, i, layer) for i in range(1, S + 1) for layer in range(L)}
    assert {k for k, v in table.items() if v} == {(i, layer) for i in range(3, 9) for layer in (0, 1)}
    assert not any(stale(plan.replace(mode="sync"), i, 0) for i in range(1, S + 1))
    assert not any(stale(plan.replace(ep_size=1), i, 0) for i in range(1, S + 1))
    displaced = plan.replace(mode="displaced", async_layers="interleaved", warmup=0, cooldown=0)
    assert [layer for layer in range(L) if stale(displaced, 5, layer)] == [0, 2]
    assert not stale(displaced, S, 0)  # the first step is always sync


def test_is_skip_step():
    assert [i for i in range(10, 0, -1) if is_skip_step(i, 2)] == [9, 7, 5, 3, 1]
    assert [i for i in range(10, 0, -1) if is_skip_step(i, 3)] == [10, 8, 7, 5, 4, 2, 1]
    assert not any(is_skip_step(i, 1) for i in range(1, 11))
    with pytest.raises(ValueError, match="skip_period"):
        is_skip_step(3, 0)


def test_step_skips_every_named_step_but_the_first():
    plan = ParallelPlan(ep_size=2, mode="interweaved", skip_period=2, skip_strategy="low", cooldown=1)
    # 9 is the first step (no slot cache yet); 1 is a cool-down sync step and still skips
    assert [i for i in range(9, 0, -1) if step_skips(i, 9, plan)] == [7, 5, 3, 1]
    assert [i for i in range(10, 0, -1) if step_skips(i, 10, plan)] == [9, 7, 5, 3, 1]
    assert not any(step_skips(i, 9, plan.replace(ep_size=1)) for i in range(1, 10))
    sync_plan = plan.replace(mode="sync")  # conditional communication also applies to sync EP
    assert [i for i in range(9, 0, -1) if step_skips(i, 9, sync_plan)] == [7, 5, 3, 1]
    assert [i for i in range(9, 0, -1) if step_skips(i, 9, plan.replace(skip_period=3))] == [8, 7, 5, 4, 2, 1]


def test_schedule_json_is_consistent():
    plan = ParallelPlan(ep_size=2, mode="interweaved", async_layers="shallow", strided=5,
                        skip_period=2, skip_strategy="low")
    d = Schedule.build(plan, num_steps=10, depth=8).to_json()
    assert json.loads(json.dumps(d)) == d
    assert d["ep_sync_steps"] == [10, 5]
    assert d["async_layers"] == [0, 1, 2, 3]
    assert d["ring"] == {"0": 3, "1": 0, "2": 1, "3": 2}
    assert d["skip_steps"] == [9, 7, 5, 3, 1]
    displaced = Schedule.build(plan.replace(mode="displaced"), 10, 8).to_json()
    assert displaced["ring"] == {} and displaced["async_layers"] == [0, 1, 2, 3]
    sync = Schedule.build(plan.replace(mode="sync", skip_period=1), 4, 8).to_json()
    assert sync["ep_sync_steps"] == [4, 3, 2, 1] and sync["async_layers"] == []
    assert sync["skip_steps"] == []
