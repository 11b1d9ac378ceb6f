"""ParallelPlan's sequence-parallel fields: validation errors name the flag."""
import pytest

from dice_ds.config import ConfigError
from dice_ds.parallel.plan import ParallelPlan

OK = dict(world_size=4, num_experts=4, depth=2, tokens=16)


def test_valid_sp_plans():
    ParallelPlan(sp_size=4).validate(**OK)
    ParallelPlan(sp_size=2, sp_async=True, sp_warmup=3).validate(**OK)
    ParallelPlan(ep_size=2, sp_size=2, single_img=True).validate(**OK)  # 2x2 mesh
    assert ParallelPlan(sp_size=2).sp_enabled and not ParallelPlan().sp_enabled


@pytest.mark.parametrize("fields,message", [
    (dict(sp_size=3), r"sp_size=3 \(--sp-size\)"),
    (dict(sp_size=4, ep_size=2), "must divide the world size 4"),
    (dict(sp_async=True), r"--sp-async\) needs sequence parallelism"),
    (dict(sp_size=2, sp_warmup=1), r"--sp-async-warm-up\) needs --sp-async"),
    (dict(sp_size=2, sp_async=True, sp_warmup=-1), "must be >= 0"),
    (dict(single_img=True), r"--single-img\) needs --sp"),
    (dict(sp_size=2, sp_bucket_layers=0), "sp_bucket_layers"),
])
def test_bad_sp_plans_name_the_flag(fields, message):
    with pytest.raises(ConfigError, match=message):
        ParallelPlan(**fields).validate(**OK)


def test_token_count_not_divisible_is_an_error():
    with pytest.raises(ConfigError, match="the 36 tokens of an image do not split into 8"):
        ParallelPlan(sp_size=8).validate(world_size=8, num_experts=8, depth=2, tokens=36)


def test_sweep_sp_rows_pass_the_samplers_validation():
    from pathlib import Path

    from dice_ds.eval.sweep import MODES, SweepConfig, rejected_by_sampler
    from dice_ds.options import build_plan

    ckpt = str(Path(__file__).parents[2] / "dice_ds" / "assets" / "digits_dit_moe.pt")
    for name, async_ in (("sync SP", False), ("displaced SP", True)):
        mode = next(m for m in MODES if m.name == name)
        opts, rejected = rejected_by_sampler(SweepConfig(ckpt=ckpt), mode, Path("out"))
        assert rejected is None, name
        plan = build_plan(opts, world_size=2, num_experts=8, depth=4)
        assert plan.sp_size == 2 and plan.sp_async == async_ and plan.ep_size == 1


def test_sp_batches_cover_exactly_the_dp_indices():
    from dice_ds.outputs import batch_indices
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.sp_batches import sp_batches

    assert ParallelDims(4, 1, 2).sp_ranks() == [[0, 1], [2, 3]]
    assert ParallelDims(4, 2, 2).sp_ranks() == [[0, 2], [1, 3]]      # the 2x2 mesh: EP [0,1] [2,3]
    assert ParallelDims(8, 2, 2).sp_ranks() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    world, n, b = 4, 3, 1
    for plan in (ParallelPlan(sp_size=4), ParallelPlan(sp_size=2, ep_size=2),
                 ParallelPlan(sp_size=4, single_img=True), ParallelPlan()):
        for order in ("ep-inner", "sp-inner", "dp-inner"):  # any rank layout
            dims = ParallelDims(world, plan.ep_size, plan.sp_size, order)
            for rank in range(world):
                subs = sp_batches(plan, dims, b, rank, n)
                written = [i for indices, mine in subs for i in indices[mine]]
                assert written == batch_indices(b, rank, world, n), (plan, rank)
                group = (next(g for g in dims.sp_ranks() if rank in g) if plan.sp_enabled
                         else [rank])
                # every rank of an SP group samples the same sub-batches
                assert all([ix for ix, _ in sp_batches(plan, dims, b, r, n)]
                           == [ix for ix, _ in subs] for r in group)
    one = sp_batches(ParallelPlan(sp_size=2, single_img=True), ParallelDims(2, 1, 2), 0, 1, 1)
    assert [(ix, m) for ix, m in one] == [([0], slice(0, 0)), ([1], slice(0, 1))]
