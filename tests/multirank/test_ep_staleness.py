"""Staleness of displaced and interweaved EP, checked step by step against per-step references.

Each rank drives the MoE layers of an EP-sharded debug model directly: at every step i (S..1) layer l
gets its own input h[i][l] (seeded by rank, step and layer), so each step routes differently. A
single-process reference model with the same weights gives, for every (step, layer), the shared
expert output and each token's two slot experts, their router probs and their UNWEIGHTED outputs.
A layer output at step i is then identified as ``shared(h[i]) + sum_slots w * expert(h[r])`` for a
unique source step r (w = the router probs of step r for 'cached' weights, of step i for 'current').
Expected r (spec §2.2.2 / §2.2.3): i on sync steps and sync layers; displaced: i+1 right after a
sync step, else i+2; interweaved: i+1 at every async layer, also right after a sync step.

Because routing changes every step, a combine that used the current step's metadata instead of the
record stored with its buffer would match no step: the negative control sabotages exactly that and
must be detected (pitfall 13). One step forces every token of layer 0 onto experts {0, 1}, so EP
rank 1's experts get zero tokens (pitfall 16).
"""
import pytest
import torch

from distributed import run_ranks
from ep_reference import MATCH_ATOL, build_pair, layer_inputs, reference_parts
from ep_reference import expected_source as ref_source

S = 8
DEPTH = 4
ZERO_STEP = 5  # layer 0 routes every token to experts {0, 1} at this step
PLANS = {
    "displaced_all": dict(mode="displaced", async_layers="all"),
    "displaced_shallow_sched": dict(mode="displaced", async_layers="shallow", warmup=1,
                                    cooldown=1, strided=4),
    "interweaved_all_strided": dict(mode="interweaved", async_layers="all", strided=4),
    "interweaved_interleaved_cool": dict(mode="interweaved", async_layers="interleaved",
                                         cooldown=2),
    "interweaved_ring_of_one": dict(mode="interweaved", async_layers=(1,)),
    "displaced_current": dict(mode="displaced", async_layers="all",
                              stale_output_weights="current"),
    "interweaved_deep_current": dict(mode="interweaved", async_layers="deep",
                                     stale_output_weights="current", warmup=1),
}


def _inputs(cfg, layer0_router_w, rank: int) -> dict:
    h = layer_inputs(cfg, DEPTH, S, rank)
    v = layer0_router_w[0] + layer0_router_w[1]
    g = torch.Generator().manual_seed(rank + 77)
    h[ZERO_STEP, 0] = 60 * v / v.norm() + 0.05 * torch.randn(h[ZERO_STEP, 0].shape, generator=g)
    return h


def _identify(out_TD, parts, i, l, current: bool):
    """(best source step, its max error, the runner-up's error)."""
    shared_i, probs_i = parts[i, l][0], parts[i, l][1]
    errs = {}
    for r in range(1, S + 1):
        _, probs_r, f_T2D, _ = parts[r, l]
        w = probs_i if current else probs_r
        expect = shared_i + (w.unsqueeze(-1) * f_T2D).sum(1)
        errs[r] = (out_TD - expect).abs().max().item()
    ranked = sorted(errs, key=errs.get)
    return ranked[0], errs[ranked[0]], errs[ranked[1]]


def _sabotage_combine_metadata(layer) -> None:
    """Negative control: unpermute stale rows with the CURRENT step's record."""
    from dice_ds.moe.dispatcher import install_record

    disp = layer.token_dispatcher
    original = disp.token_combine

    def token_combine(rows, *args, **kwargs):
        out = original(rows, *args, **kwargs)
        install_record(disp, disp.state.dispatch.record)
        return out

    disp.token_combine = token_combine


@torch.no_grad()
def _run_plan(model, groups, plan, h, parts, sabotage: bool = False) -> dict:
    from dice_ds.parallel.apply import parallelize_dit_moe
    from dice_ds.schedule import Schedule

    rt = parallelize_dit_moe(model, plan, groups)
    if sabotage:
        _sabotage_combine_metadata(model.blocks[1].moe)
    found, inflight = {}, {}
    with rt.batch(Schedule.build(plan, S, DEPTH)):
        for i in range(S, 0, -1):
            rt.begin_step(i)
            for l in range(DEPTH):
                out = model.blocks[l].moe(h[i, l])
                found[i, l] = _identify(out.view(-1, out.shape[-1]), parts, i, l,
                                        plan.stale_output_weights == "current")
            inflight[i] = rt.inflight_handles()
    result = {"found": found, "inflight": inflight, "after_finish": rt.inflight_handles(),
              "stats": rt.stats()}
    rt.detach()
    return result


def _staleness_ranks(rank, world, ep_size, plan_names):
    from dice_ds.config import get_flavor
    from dice_ds.parallel.plan import ParallelPlan

    cfg = get_flavor("debug").replace(depth=DEPTH)
    model, groups, ref = build_pair(cfg, ep_size)
    h = _inputs(cfg, ref.blocks[0].moe.router.weight, rank)
    parts = reference_parts(ref, h)
    results = {name: _run_plan(model, groups, ParallelPlan(ep_size=ep_size, **PLANS[name]), h,
                               parts) for name in plan_names}
    if "displaced_all" in plan_names:
        results["sabotaged"] = _run_plan(model, groups, ParallelPlan(ep_size=ep_size,
                                                                     **PLANS["displaced_all"]),
                                         h, parts, sabotage=True)
    results["zero_step_experts"] = parts[ZERO_STEP, 0][3].any(0).nonzero().flatten().tolist()
    results["local_experts"] = list(model.blocks[0].moe.local_expert_indices)
    return results


def expected_source(plan_kw: dict, i: int, layer: int) -> int:
    return ref_source(plan_kw, S, DEPTH, i, layer)


def _check_plan(name: str, res: dict) -> None:
    from dice_ds.parallel.plan import ParallelPlan
    from dice_ds.schedule import Schedule

    plan_kw = PLANS[name]
    sched = Schedule.build(ParallelPlan(ep_size=2, **plan_kw), S, DEPTH)
    for (i, l), (src, err, runner_up) in res["found"].items():
        assert src == expected_source(plan_kw, i, l), (name, i, l, src, err)
        assert src == sched.call(i, l).returns, (name, i, l)  # what the schedule tells its readers
        assert err < MATCH_ATOL and runner_up > 100 * MATCH_ATOL, (name, i, l, err, runner_up)
    assert res["after_finish"] == 0
    stale_steps = [i for i in range(S, 0, -1) if any(
        expected_source(plan_kw, i, l) != i for l in range(DEPTH))]
    assert stale_steps and all(res["inflight"][i] > 0 for i in stale_steps)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return run_ranks(_staleness_ranks, 2, tmp_path_factory.mktemp("stale2"), 2, tuple(PLANS))


@pytest.mark.parametrize("name", list(PLANS))
def test_staleness_sequence_2_ranks(two_rank_results, name):
    for res in two_rank_results:
        _check_plan(name, res[name])


def test_staleness_timelines(two_rank_results):
    """Spelled out: displaced fresh, 1, then 2 steps stale; interweaved 1 after every sync step."""
    def staleness(name, layer):
        found = two_rank_results[0][name]["found"]
        return [found[i, layer][0] - i for i in range(S, 0, -1)]

    assert staleness("displaced_all", 0) == [0, 1, 2, 2, 2, 2, 2, 2]
    assert staleness("interweaved_all_strided", 3) == [0, 1, 1, 1, 0, 1, 1, 1]
    # sync {8, 7, 4, 1}; layers 0, 1 async, 2, 3 sync
    assert staleness("displaced_shallow_sched", 1) == [0, 0, 1, 2, 0, 1, 2, 0]
    assert staleness("displaced_shallow_sched", 2) == [0] * S


def test_combine_uses_the_record_stored_with_its_buffer(two_rank_results):
    """Sabotaged (current metadata for stale rows): layer 1 matches no step; layer 0 still does."""
    for res in two_rank_results:
        found = res["sabotaged"]["found"]
        stale = [i for i in range(S - 2, 0, -1)]
        assert all(found[i, 1][1] > 100 * MATCH_ATOL for i in stale), found
        assert all(found[i, 0][1] < MATCH_ATOL for i in range(S, 0, -1))


def test_zero_token_experts_survive_stale_exchanges(two_rank_results):
    """At ZERO_STEP every token of layer 0 (every rank) routes to experts {0, 1} (pitfall 16)."""
    assert two_rank_results[0]["local_experts"] == [0, 1]
    for res in two_rank_results:
        assert res["zero_step_experts"] == [0, 1]
        for name in ("displaced_all", "interweaved_all_strided"):
            assert res[name]["found"][ZERO_STEP, 0][1] < MATCH_ATOL


def test_staleness_4_ranks_ep4_and_ep2_inside_dp(tmp_path):
    """EP 4 (one local expert per rank) and EP 2 inside world 4 (two EP groups)."""
    names = ("displaced_all", "interweaved_all_strided")
    for ep_size in (4, 2):
        store_dir = tmp_path / f"ep{ep_size}"  # a fresh file store per world
        store_dir.mkdir()
        results = run_ranks(_staleness_ranks, 4, store_dir, ep_size, names)
        for res in results:
            for name in names:
                _check_plan(name, res[name])
