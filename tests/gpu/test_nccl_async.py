"""Every async EP mode on 2 GPUs with NCCL (skipped unless ``torch.cuda.device_count() >= 2``).

The CUDA/NCCL counterpart of tests/multirank/test_ep_modes.py, with its helpers (``euler_sample``,
``_batch``, ``MODES``, tolerances) and tests/distributed.py's ``run_ranks(..., device="cuda")``:
each rank samples the debug model (fp32, TF32 off) with a single-process model (DP reference, its
own 1-rank group) and with the EP=2 model in sync, displaced, interweaved and DICE (interweaved +
shallow async + low-score skipping with P = 2) modes, for both ``ModelConfig.experts_impl``.
Checks: sync EP equals the single-process reference (to fp32 rounding: GPU kernels may differ with
the batch size, so bitwise equality is reported, not required); async modes are finite and within
the gloo tests' staleness tolerance of sync EP, interweaved closer than displaced; forced-sync steps
leave no NCCL work in flight and ``finish`` drains everything; DICE sends fewer rows than
interweaved; the phase timers (CUDA events) report finite seconds.

    python -m pytest -q tests/gpu/test_nccl_async.py      # on a machine with >= 2 GPUs
"""
import math

import pytest
import torch

from distributed import run_ranks
from multirank.test_ep_modes import MODES, S, STALE_REL_TOL, WEIGHT_STD, _batch, _rel, euler_sample

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA devices")]

ASYNC = ("displaced", "interweaved", "dice")
SYNC_REL_TOL = 1e-5  # sync EP vs the single-process model, fp32 without TF32


def _nccl_ranks(rank, world, impl):
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.apply import parallelize_dit_moe
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups, local_model_groups
    from dice_ds.parallel.plan import ParallelPlan

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = get_flavor("debug").replace(experts_impl=impl)
    z0, y = (v.cuda() for v in _batch(cfg, rank))
    out = {}
    dp_groups = local_model_groups()
    dp = init_weights(build_model(cfg, dp_groups, device="cuda"), "random", seed=21, std=WEIGHT_STD)
    rt = parallelize_dit_moe(dp, ParallelPlan(ep_size=1), dp_groups)
    out["dp"] = dict(z=euler_sample(dp, rt, z0, y)[0].cpu())
    groups = build_groups(ParallelDims(2, 2))
    model = init_weights(build_model(cfg, groups, device="cuda"), "random", seed=21, std=WEIGHT_STD)
    for name in ("sync",) + ASYNC:
        rt = parallelize_dit_moe(model, ParallelPlan(ep_size=2, **MODES[name]), groups)
        z, inflight = euler_sample(model, rt, z0, y)
        out[name] = dict(z=z.cpu(), inflight=inflight, stats=rt.stats(),
                         after=rt.inflight_handles())
        rt.detach()
    return out


@pytest.fixture(scope="module", params=["sequential", "grouped"])
def results(request, tmp_path_factory):
    return run_ranks(_nccl_ranks, 2, tmp_path_factory.mktemp("nccl"), request.param,
                     device="cuda", timeout=600)


def test_sync_ep_matches_single_process(results):
    for res in results:
        assert res["sync"]["stats"]["a2a_rows_sent"] > 0
        rel = _rel(res["sync"]["z"], res["dp"]["z"])
        assert rel <= SYNC_REL_TOL, rel
        print(f"sync EP vs single process: rel {rel:.2e}, bitwise "
              f"{torch.equal(res['sync']['z'], res['dp']['z'])}")


@pytest.mark.parametrize("name", ASYNC)
def test_async_modes_finite_and_close_to_sync(results, name):
    for res in results:
        z, ref = res[name]["z"], res["sync"]["z"]
        assert torch.isfinite(z).all()
        assert 0 < _rel(z, ref) < STALE_REL_TOL, (name, _rel(z, ref))


def test_interweaved_is_closer_to_sync_than_displaced(results):
    for res in results:
        ref = res["sync"]["z"]
        assert _rel(res["interweaved"]["z"], ref) < _rel(res["displaced"]["z"], ref)


def test_sync_steps_leave_nothing_in_flight(results):
    for res in results:
        for name in ("displaced", "interweaved"):
            sync = res[name]["stats"]["sync_steps"]
            assert sync == [3, 6] and S == 6
            for i, (after_begin, after_forward) in res[name]["inflight"].items():
                if i in sync:
                    assert after_begin == 0 and after_forward == 0, (name, i)
                else:
                    assert after_forward > 0, (name, i)
        for name in ASYNC:
            assert res[name]["after"] == 0


def test_dice_skips_rows_and_timers_work(results):
    for res in results:
        assert res["dice"]["stats"]["a2a_rows_sent"] < res["interweaved"]["stats"]["a2a_rows_sent"]
        for name in ("sync",) + ASYNC:
            phases = res[name]["stats"]["phase_seconds"]
            assert phases and all(math.isfinite(v) and v > -1e-4 for v in phases.values()), phases
