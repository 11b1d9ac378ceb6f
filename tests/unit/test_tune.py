"""dice_ds.tune: the deviation proxy, the PSNR fit and the policy search on synthetic tables."""

from __future__ import annotations

import math

import pytest

from dice_ds.parallel.plan import ParallelPlan
from dice_ds.schedule import Schedule
from dice_ds.tune import quality, search

S, L = 4, 2
TABLE = {"steps": S, "stale": {"1": [[float(l + 1)] * (S + 1) for l in range(L)],
                               "2": [[10.0 * (l + 1)] * (S + 1) for l in range(L)]},
         "low_share": [0.5, 0.5]}


def _d(**kw):
    return quality.deviation(Schedule.build(ParallelPlan(ep_size=2, **kw), S, L), TABLE)


def test_deviation_counts_staleness_per_call():
    assert _d() == 0.0                                                    # sync EP
    assert _d(mode="interweaved", async_layers=(0,)) == 3 * 1.0           # steps 3, 2, 1
    # displaced: step 3 comes right after the sync step 4 (1 stale), steps 2, 1 are 2 stale
    assert _d(mode="displaced", async_layers=(0,)) == 1.0 + 2 * 10.0
    assert _d(mode="interweaved", async_layers=(0,), warmup=1) == 2 * 1.0
    # low skip (P = 2: steps 3 and 1) costs only on the sync layer 1: 2 x 0.5 x 2.0
    assert _d(mode="interweaved", async_layers=(0,), skip_period=2,
              skip_strategy="low") == 3.0 + 2.0


def test_skip_substitute_ages_with_the_period():
    # P = 4 over S = 4: steps 3, 2, 1 skip, their cached slot is 1, 2, 3 steps old (3: linear
    # from the 2-step value). Sync layer 1: 0.5 x (2 + 20 + 30); stale layer 0 (already 1 step
    # stale, error 1): 0.5 x ((1 - 1) + (10 - 1) + (15 - 1)); plus its staleness 3 x 1
    assert _d(mode="interweaved", async_layers=(0,), skip_period=4,
              skip_strategy="low") == pytest.approx(3.0 + 26.0 + 11.5)


def test_psnr_fit_recovers_a_line_and_inverts():
    pts = [(f"m{k}", d, 50.0 - 2.0 * 10 * math.log10(d)) for k, d in enumerate((0.5, 1, 4))]
    fit = quality.PsnrFit.fit(pts)
    assert fit.a == pytest.approx(50.0) and fit.b == pytest.approx(2.0)
    assert fit.max_deviation(fit.psnr(3.0)) == pytest.approx(3.0)
    assert all(abs(m - f) < 1e-9 for _, m, f in fit.residuals)


SENS = [1.0, 5.0, 2.0, 10.0]


def _ev(p: search.Policy):
    return 1.0 + 0.1 * len(p.layers), sum(SENS[l % 4] for l in p.layers)


ONE = {"mode": ("interweaved",), "warmup": (0,), "cooldown": (0,), "strided": (0,),
       "period": (1,)}


def test_exhaustive_search_takes_the_fastest_subset_within_budget():
    best, seen = search.search(4, _ev, d_max=3.5, grid=ONE)
    assert best[0].layers == (0, 2) and best[1] == pytest.approx(1.2)
    assert len(seen) == 16                                   # every subset, empty included


def test_greedy_search_adds_the_cheapest_layers_first():
    best, _ = search.search(12, _ev, d_max=12.0, grid=ONE)   # depth 12 > EXHAUSTIVE_MAX
    # sensitivities 1, 5, 2, 10 repeating: the three 1s and three 2s fit (D = 9), no 5 fits
    assert sorted(best[0].layers) == [0, 2, 4, 6, 8, 10] and best[2] == pytest.approx(9.0)


def test_speed_tolerance_spends_unresolved_speed_on_quality():
    # layer 0: +0.10 speed-up at D 1; layer 1: +0.105 at D 5 (within 1 % of the fastest pair)
    def ev(p):
        return (1.0 + sum((0.10, 0.105)[l] for l in p.layers if l < 2),
                sum((1.0, 5.0)[l] for l in p.layers if l < 2) + 100.0 * any(l >= 2 for l in p.layers))

    best, _ = search.search(4, ev, d_max=5.5, grid=ONE)
    assert best[0].layers == (1,)                       # plain: the fastest feasible
    best, _ = search.search(4, ev, d_max=5.5, grid=ONE, tolerance=0.02)
    assert best[0].layers == (0,) and best[2] == pytest.approx(1.0)   # 1.10 vs 1.105: a tie


def test_verify_shortlist_is_the_thinned_pareto_front_and_choice_is_measured():
    from dice_ds.tune import verify

    P = search.Policy
    seen = [(P(layers=(0,)), 1.50, 5.0), (P(layers=(1,)), 1.49, 4.0), (P(layers=(2,)), 1.48, 4.5),
            (P(layers=(0, 1)), 1.45, 3.0), (P(layers=(3,)), 1.20, 1.0), (P(layers=(2, 3)), 1.6, 9.0)]
    # d_max 6 drops (2, 3); window 10 % drops 1.20; (2,) is dominated by (1,)
    front = verify.shortlist(seen, d_max=6.0, window=0.10, k=5)
    assert [x[0].layers for x in front] == [(0,), (1,), (0, 1)]
    two = verify.shortlist(seen, d_max=6.0, window=0.10, k=2)
    assert [x[0].layers for x in two] == [(0,), (0, 1)]          # the ends are kept
    kept = verify.shortlist(seen, d_max=6.0, window=0.10, k=2, keep=seen[1])
    assert [x[0].layers for x in kept] == [(0,), (1,), (0, 1)]   # plus the search's choice
    measured = {P(layers=(0,)): 1.30, P(layers=(1,)): 1.41, P(layers=(0, 1)): 1.40}
    pick = verify.choose(front, measured, tolerance=0.0)
    assert pick[0].layers == (1,) and pick[1] == pytest.approx(1.41)
    pick = verify.choose(front, measured, tolerance=0.02)          # 1.40 ties 1.41: smaller D
    assert pick[0].layers == (0, 1)
    assert verify.choose(front, {}, 0.02) is None


def test_no_feasible_policy_gives_none():
    best, _ = search.search(4, lambda p: (1.0, 1.0), d_max=0.5, grid=ONE)
    assert best is None


def test_policy_becomes_a_valid_sample_config():
    from dice_ds.ds_config import convert_flat, validate_data
    from dice_ds.options import async_layers_of, build_plan, parse_options

    p = search.Policy("interweaved", (0, 2), warmup=1, period=2)
    data = convert_flat({"model": "digits", **p.settings()})
    validate_data(data, "<test>")
    assert data["dice"]["async"]["layers"] == [0, 2]
    opts = parse_options(p.flags() + ["--model", "digits", "--init", "random"])
    assert async_layers_of(opts) == (0, 2)
    plan = build_plan(opts, world_size=2, num_experts=8, depth=4)
    assert plan == p.plan(2).replace(skip_seed=plan.skip_seed,
                                     stale_output_weights=plan.stale_output_weights)


def test_tune_rejects_bad_verify_arguments(capsys):
    from dice_ds.tune.cli import main

    assert main(["--budget", "dice", "--verify", "2", "--link", "fast-ish"]) == 2
    assert "fast-ish" in capsys.readouterr().err
    assert main(["--budget", "dice", "--verify", "2", "--verify-window", "1.5"]) == 2
    assert "--verify-window" in capsys.readouterr().err
    assert main(["--budget", "dice", "--evidence-also", "broken"]) == 2
    assert "NAME=" in capsys.readouterr().err


def test_search_may_choose_overlapped_sync_calls():
    # overlap hides half of every sync call's exchange: worth most to the policy with most sync calls
    def ev(p: search.Policy):
        speed, dev = _ev(p)
        return speed + (0.05 * (4 - len(p.layers)) if p.overlap else 0.0), dev

    best, seen = search.search(4, ev, d_max=1.5, grid={**ONE, "overlap": (False, True)})
    assert best[0].overlap and best[0].layers == (0,) and best[1] == pytest.approx(1.25)
    assert {p.overlap for p, _, _ in seen} == {False, True}
    assert search.search(4, ev, d_max=1.5, grid=ONE)[0][0].overlap is False  # not in the grid


def test_overlapped_policy_becomes_a_valid_sample_config():
    from dice_ds.ds_config import convert_flat, validate_data

    p = search.Policy("interweaved", (1,), period=2, overlap=True)
    data = convert_flat({"model": "digits", **p.settings()})
    validate_data(data, "<test>")
    assert data["dice"]["communication"]["overlap"] is True
    assert "--ep-overlap" in p.flags()
    assert p.plan(2).ep_overlap and not search.Policy("interweaved", (1,)).plan(2).ep_overlap
