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
    (dict(sp_size=3), r"sp_size=3 \(--sp\)"),
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
