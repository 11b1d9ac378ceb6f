"""dice_ds.schedule.Schedule against the policy tables (tests/unit/test_policy.py) and the
table of exchanges kept after a sync step."""
import json

import pytest

from dice_ds.lifecycle import RuntimeStack, StepRuntime
from dice_ds.moe import policy
from dice_ds.parallel.plan import ParallelPlan
from dice_ds.schedule import Schedule

PLANS = [
    ParallelPlan(),
    ParallelPlan(ep_size=2),
    ParallelPlan(ep_size=2, mode="displaced", async_layers="all", warmup=2, cooldown=1),
    ParallelPlan(ep_size=2, mode="interweaved", async_layers="shallow", strided=5,
                 skip_period=2, skip_strategy="low"),
    ParallelPlan(ep_size=4, mode="interweaved", async_layers=(1, 4, 6), cooldown=3),
    ParallelPlan(ep_size=2, mode="sync", skip_period=3, skip_strategy="rand"),
    ParallelPlan(sp_size=2),
    ParallelPlan(sp_size=2, sp_async=True, sp_warmup=2),
    ParallelPlan(ep_size=2, mode="interweaved", async_layers="all", sp_size=2, sp_async=True),
]


@pytest.mark.parametrize("plan", PLANS, ids=range(len(PLANS)))
def test_schedule_equals_the_policy_functions(plan):
    S, L = 10, 8
    sched = Schedule.build(plan, S, L)
    for i in range(S, 0, -1):
        assert sched.ep_sync_step(i) == (i in policy.sync_steps(S, plan.warmup, plan.cooldown,
                                                                 plan.strided)
                                         or not plan.async_enabled)
        for l in range(L):
            assert sched.ep_stale(i, l) == policy.layer_is_async(i, S, l, plan, L), (i, l)
            assert sched.skips(i, l) == policy.step_skips(i, S, plan)
    async_layers = policy.async_layer_indices(plan.async_layers, L) if plan.async_enabled else ()
    for l in range(L):
        if plan.mode == "interweaved" and l in async_layers:
            assert sched.ring_source(l) == policy.ring_predecessor(l, async_layers)
        else:
            assert sched.ring_source(l) == l
    d = sched.to_json()
    assert json.loads(json.dumps(d)) == d
    legacy = policy.describe_schedule(plan, S, L)
    assert d["ep_sync_steps"] == legacy["sync_steps"]
    assert d["async_layers"] == legacy["async_layers"] and d["ring"] == legacy["ring"]
    assert d["skip_steps"] == legacy["skip_steps"]


def test_keeps_after_sync_table():
    """Displaced keeps both exchanges of every async layer; interweaved the ring tail's dispatch
    and every other async layer's combine; sync layers nothing (what the dispatchers consume)."""
    for mode in ("displaced", "interweaved"):
        plan = ParallelPlan(ep_size=2, mode=mode, async_layers="interleaved")
        sched = Schedule.build(plan, 6, 8)
        ring = sched.async_layers
        assert ring == (0, 2, 4, 6)
        for l in range(8):
            if l not in ring:
                expect = (False, False)
            elif mode == "displaced":
                expect = (True, True)
            else:
                expect = (l == ring[-1], l != ring[-1])
            assert sched.keeps_after_sync(l) == expect, (mode, l)
    assert Schedule.build(ParallelPlan(ep_size=2), 6, 8).keeps == ((False, False),) * 8


def test_sp_sync_steps_and_cache_clears():
    S = 6
    sync_sp = Schedule.build(ParallelPlan(sp_size=2), S, 2)
    assert sync_sp.sp_sync_steps == frozenset(range(1, S + 1))
    assert not any(sync_sp.sp_clears_cache(i) for i in range(1, S + 1))
    df = Schedule.build(ParallelPlan(sp_size=2, sp_async=True), S, 2)
    assert df.to_json()["sp_sync_steps"] == [6]            # the first step of a batch only
    df2 = Schedule.build(ParallelPlan(sp_size=4, sp_async=True, sp_warmup=2), S, 2)
    assert df2.to_json()["sp_sync_steps"] == [6, 5, 4]     # rev 0, then rev 1..w
    assert [i for i in range(S, 0, -1) if df2.sp_clears_cache(i)] == [6, 5, 4]
    assert Schedule.build(ParallelPlan(), S, 2).to_json()["sp_sync_steps"] == []
    with pytest.raises(ValueError, match="step"):
        df.sp_sync_step(0)
    with pytest.raises(ValueError, match="layer"):
        df.ep_stale(3, 2)


def test_schedule_is_frozen():
    sched = Schedule.build(ParallelPlan(ep_size=2, mode="displaced"), 4, 2)
    with pytest.raises(AttributeError):
        sched.num_steps = 5


class _Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def reset(self):
        self.log.append((self.name, "reset"))

    def begin_step(self, i, S):
        self.log.append((self.name, i))

    def finish(self):
        self.log.append((self.name, "finish"))

    def stats(self):
        return {f"{self.name}_calls": len(self.log)}


def test_runtime_stack_drives_each_runtime_in_order():
    log = []
    a, b = _Recorder("a", log), _Recorder("b", log)
    stack = RuntimeStack(a, b)
    assert isinstance(a, StepRuntime) and isinstance(stack, StepRuntime)
    stack.reset()
    stack.begin_step(2, 2)
    stack.finish()
    assert log == [("a", "reset"), ("b", "reset"), ("a", 2), ("b", 2), ("a", "finish"),
                   ("b", "finish")]
    assert set(stack.stats()) == {"a_calls", "b_calls"}
    assert stack[_Recorder] is a
    with pytest.raises(KeyError, match="same stats keys"):
        RuntimeStack(a, _Recorder("a", log)).stats()
