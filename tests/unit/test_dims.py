"""``ParallelDims``: one validation of the sizes, the rank layout of every group."""
import pytest

from dice_ds.config import ConfigError
from dice_ds.parallel.dims import ParallelDims


def test_layout_of_the_2x2_mesh():
    d = ParallelDims(4, ep=2, sp=2).validate(num_experts=8, tokens=16)
    assert d.dp == 1
    assert d.ep_ranks() == [[0, 1], [2, 3]]
    assert d.sp_ranks() == [[0, 2], [1, 3]]
    assert d.expt_dp_ranks() == [[0, 2], [1, 3]]


def test_layout_ep_inside_dp():
    d = ParallelDims(8, ep=2)
    assert d.dp == 4 and d.ep_ranks()[1] == [2, 3] and d.expt_dp_ranks()[0] == [0, 2, 4, 6]
    assert ParallelDims(4, sp=2).sp_ranks() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("dims, kw, words", [
    (ParallelDims(4, ep=3), {}, "ep_size=3 (--ep-size) must divide the world size 4"),
    (ParallelDims(4, ep=2, sp=4), {}, "sp_size=4"),
    (ParallelDims(4, ep=4), {"num_experts": 6}, "num_experts=6 is not divisible"),
    (ParallelDims(2, sp=2), {"tokens": 9}, "do not split into 2 equal chunks"),
])
def test_bad_sizes_are_one_line(dims, kw, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        dims.validate(**kw)


def test_layout_names_the_groups_that_cross_nodes():
    hosts = ["a", "a", "b", "b"]
    inside = ParallelDims(4, ep=2).layout(hosts)  # EP pairs inside a node, expert-DP across
    assert inside["nodes"] == 2 and inside["groups"]["ep"] == [[0, 1], [2, 3]]
    assert inside["crossing_nodes"] == {"ep": [], "expt_dp": [[0, 2], [1, 3]]}
    mesh = ParallelDims(4, ep=2, sp=2).layout(hosts)
    assert mesh["crossing_nodes"]["sp"] == [[0, 2], [1, 3]] and mesh["crossing_nodes"]["ep"] == []
    assert ParallelDims(4, ep=4).layout(hosts)["crossing_nodes"]["ep"] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        ParallelDims(4).layout(["a"])
