"""dice_ds.schedule.Schedule against its rules (tables in tests/unit/test_policy.py), what a call
computes and returns and what a layer holds, the batch lifecycle of a runtime stack, and the one
decider: a changed rule changes the dispatchers' input, the plan's simulation and memory column
and the tuner's quality model alike."""
import json

import pytest

from dice_ds import schedule as schedule_mod
from dice_ds.config import ModelConfig
from dice_ds.lifecycle import BatchLifecycle, RuntimeStack, StepRuntime
from dice_ds.parallel.plan import ParallelPlan
from dice_ds.plan.costs import LayerCosts
from dice_ds.plan.memory import memory
from dice_ds.plan.presets import Link
from dice_ds.plan.sim import simulate
from dice_ds.schedule import (
    Call,
    Held,
    Schedule,
    async_layer_indices,
    ring_predecessor,
    step_skips,
    sync_steps,
)
from dice_ds.tune import quality
from dice_ds.workload import Workload, messages

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
def test_schedule_equals_its_rules(plan):
    S, L = 10, 8
    sched = Schedule.build(plan, S, L)
    stale_mode = plan.async_enabled
    sync = sync_steps(S, plan.warmup, plan.cooldown, plan.strided)
    async_layers = async_layer_indices(plan.async_layers, L) if stale_mode else ()
    for i in range(S, 0, -1):
        assert sched.ep_sync_step(i) == (i in sync or not stale_mode)
        for l in range(L):
            assert sched.ep_stale(i, l) == (stale_mode and i not in sync and l in async_layers)
            assert sched.skips(i, l) == step_skips(i, S, plan)
    for l in range(L):
        if plan.mode == "interweaved" and l in async_layers:
            assert sched.ring_source(l) == ring_predecessor(l, async_layers)
        else:
            assert sched.ring_source(l) == l
    d = sched.to_json()
    assert json.loads(json.dumps(d)) == d
    assert d["ep_sync_steps"] == sorted(sched.ep_sync_steps, reverse=True)
    assert d["async_layers"] == list(async_layers)


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


def _calls(sched, step):
    return [(c.computes, c.returns, c.computed_at, c.own_work)
            for c in (sched.call(step, l) for l in range(sched.depth))]


def test_call_table_displaced():
    """Displaced computes its own previous-step dispatch; returns outputs 2 steps old, 1 right
    after a sync step (the combine the sync call kept)."""
    sched = Schedule.build(ParallelPlan(ep_size=2, mode="displaced", async_layers=(0,),
                                        strided=4), 8, 2)          # sync steps 8, 4
    assert sched.call(8, 0) == Call(8, 0, False, (8, 0), 8, 8, True)
    assert _calls(sched, 7)[0] == ((8, 0), 8, 8, False) and sched.call(7, 0).age == 1
    assert _calls(sched, 6)[0] == ((7, 0), 8, 7, False) and sched.call(6, 0).age == 2
    assert sched.call(6, 1).age == 0 and not sched.call(6, 1).stale   # a sync layer
    assert [sched.call(i, 0).age for i in range(8, 0, -1)] == [0, 1, 2, 2, 0, 1, 2, 2]


def test_call_table_interweaved():
    """Interweaved computes the ring predecessor's tokens (the head the tail's of the previous
    step); every stale call returns its own tokens of the previous step, computed by its ring
    successor (the tail's by the head, in the same step)."""
    sched = Schedule.build(ParallelPlan(ep_size=2, mode="interweaved", async_layers="all",
                                        strided=4), 8, 3)
    assert _calls(sched, 7) == [((8, 2), 8, 8, False), ((7, 0), 8, 8, False),
                                ((7, 1), 8, 7, False)]      # right after the sync step 8
    assert _calls(sched, 6) == [((7, 2), 7, 7, False), ((6, 0), 7, 7, False),
                                ((6, 1), 7, 6, False)]
    assert {sched.call(i, l).age for i in (7, 6, 5, 3) for l in range(3)} == {1}
    one = Schedule.build(ParallelPlan(ep_size=2, mode="interweaved", async_layers=(1,)), 4, 3)
    assert one.call(3, 1) == Call(3, 1, True, (4, 1), 4, 3, True)   # a ring of one: own work
    assert one.call(2, 1).own_work and one.call(2, 1).computes == (3, 1)


def test_holds_table():
    disp = Schedule.build(ParallelPlan(ep_size=2, mode="displaced", async_layers="shallow"), 6, 4)
    assert [disp.holds(l) for l in range(4)] == [Held(1, 1), Held(1, 1), Held(), Held()]
    iw = Schedule.build(ParallelPlan(ep_size=2, mode="interweaved", async_layers="all"), 6, 4)
    assert [iw.holds(l) for l in range(4)] == [Held(0, 1)] * 3 + [Held(1, 1)]
    one = Schedule.build(ParallelPlan(ep_size=2, mode="interweaved", async_layers=(2,)), 6, 4)
    assert one.holds(2) == Held(1, 0)
    assert Schedule.build(ParallelPlan(ep_size=2, mode="displaced"), 1, 4).holds(0) == Held()
    assert Schedule.build(ParallelPlan(ep_size=2), 6, 4).holds(0) == Held()


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
    with pytest.raises(ValueError, match="layer"):
        df.call(3, 2)


def test_schedule_is_frozen():
    sched = Schedule.build(ParallelPlan(ep_size=2, mode="displaced"), 4, 2)
    with pytest.raises(AttributeError):
        sched.num_steps = 5


# -- the one decider: change a rule, everything that reads the schedule follows ----------------------
CFG = ModelConfig("t", depth=2, hidden_size=8, num_heads=2, num_experts=4, input_size=4)
STEPS = 6
WORK = Workload(CFG, images_per_rank=1, cfg_guidance=True, steps=STEPS, dtype="fp32")
COSTS = LayerCosts(attn=1.0, router=0.5, shared=0.5, experts=2.0, post=0.0)
LINK = Link("slow", 20.0, 0.1)
TABLE = {"steps": STEPS,
         "stale": {"1": [[1.0] * (STEPS + 1)] * 2, "2": [[10.0] * (STEPS + 1)] * 2},
         "low_share": [0.5, 0.5]}


def _readers(plan):
    """What each reader of the schedule makes of ``plan``'s schedule."""
    sched = Schedule.build(plan, STEPS, CFG.depth)
    return {
        "dispatcher": [(sched.call(i, l).own_work, sched.call(i, l).computes)
                       for i in range(STEPS, 0, -1) for l in sched.async_layers],
        "sim": simulate(sched, COSTS, messages(WORK, ep=2), LINK, ranks=2).seconds,
        "memory": memory(WORK, sched, 2, 1, None)["stale_cache"],
        "quality": quality.deviation(sched, TABLE),
    }


def _one_step_displaced(mode, after_sync):
    return 1


def _all_sync(num_steps, warmup=0, cooldown=0, strided=0):
    return frozenset(range(1, num_steps + 1))


@pytest.mark.parametrize("rule,new", [("stale_output_age", _one_step_displaced),
                                      ("sync_steps", _all_sync)])
def test_every_reader_follows_a_changed_rule(monkeypatch, rule, new):
    plan = ParallelPlan(ep_size=2, mode="displaced", async_layers="all")
    before = _readers(plan)
    monkeypatch.setattr(schedule_mod, rule, new)
    after = _readers(plan)
    sched = Schedule.build(plan, STEPS, CFG.depth)
    if rule == "stale_output_age":
        # displaced returning 1-step outputs: past the first async step every stale call waits on
        # the combine it just posted (own work: the dispatcher posts, then waits), so the plan
        # predicts other waits and the tuner one step of staleness per call
        assert all(sched.call(i, 0).own_work for i in range(STEPS - 2, 0, -1))
        assert quality.deviation(sched, TABLE) == (STEPS - 1) * 2 * 1.0
        for reader in ("dispatcher", "sim", "quality"):
            assert after[reader] != before[reader], reader
        # what is held at most is unchanged: the first async step still returns the combine the
        # sync call kept; the memory column reads exactly what the schedule holds
        assert sched.holds(0) == Held(1, 1) and after["memory"] == before["memory"]
    else:  # every step sync: nothing stale, nothing held, sync EP's quality
        for reader in before:
            assert after[reader] != before[reader], reader
        assert after["memory"] == 0.0 and after["quality"] == 0.0
        assert sched.holds(0) == Held()


# -- batch lifecycle ------------------------------------------------------------------------------------
class _Recorder(BatchLifecycle):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def _start(self, schedule):
        self.log.append((self.name, "start", schedule.num_steps))

    def begin_step(self, i):
        self.log.append((self.name, i))

    def _finish(self):
        self.log.append((self.name, "finish"))

    def _abort(self):
        self.log.append((self.name, "abort"))

    def stats(self):
        return {f"{self.name}_calls": len(self.log)}


def test_runtime_stack_drives_each_runtime_in_order():
    log = []
    a, b = _Recorder("a", log), _Recorder("b", log)
    stack = RuntimeStack(a, b)
    assert isinstance(a, StepRuntime) and isinstance(stack, StepRuntime)
    sched = Schedule.build(ParallelPlan(), 2, 2)
    with stack.batch(sched):
        assert a.in_batch and b.in_batch
        stack.begin_step(2)
    assert log == [("a", "start", 2), ("b", "start", 2), ("a", 2), ("b", 2), ("b", "finish"),
                   ("a", "finish")]
    assert not a.in_batch
    assert set(stack.stats()) == {"a_calls", "b_calls"}
    assert stack[_Recorder] is a
    with pytest.raises(KeyError, match="same stats keys"):
        RuntimeStack(a, _Recorder("a", log)).stats()


def test_batch_aborts_on_an_exception():
    log = []
    stack = RuntimeStack(_Recorder("a", log), _Recorder("b", log))
    with pytest.raises(ZeroDivisionError):
        with stack.batch(Schedule.build(ParallelPlan(), 2, 2)):
            stack.begin_step(2)
            1 / 0
    assert log[-2:] == [("b", "abort"), ("a", "abort")]
    assert ("a", "finish") not in log
