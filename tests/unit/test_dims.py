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


@pytest.mark.parametrize("world, ep, sp", [(1, 1, 1), (4, 2, 1), (4, 1, 2), (4, 2, 2), (8, 2, 2),
                                           (8, 4, 1), (16, 2, 4), (8, 1, 1)])
def test_ep_inner_is_the_formula_of_one_host(world, ep, sp):
    """ep-inner (the default) keeps the lists of r = (d·sp + s)·ep + e the golden fixtures were
    written with."""
    d = ParallelDims(world, ep, sp)
    assert d.order == "ep-inner"
    assert d.ep_ranks() == [list(range(s, s + ep)) for s in range(0, world, ep)]
    assert d.expt_dp_ranks() == [list(range(s, world, ep)) for s in range(ep)]
    block = ep * sp
    assert d.sp_ranks() == [[b * block + s * ep + e for s in range(sp)]
                            for b in range(world // block) for e in range(ep)]


@pytest.mark.parametrize("order", ["ep-inner", "sp-inner", "dp-inner"])
@pytest.mark.parametrize("world, ep, sp", [(4, 2, 2), (8, 2, 2), (8, 4, 1), (8, 2, 1), (12, 3, 2)])
def test_every_layout_partitions_the_world(order, world, ep, sp):
    """Each kind's groups partition the ranks into groups of its size; an EP group and an SP
    group share one rank at most; expert-DP groups join the ranks of equal EP rank."""
    d = ParallelDims(world, ep, sp, order).validate()
    for groups, size in ((d.ep_ranks(), ep), (d.sp_ranks(), sp), (d.expt_dp_ranks(), world // ep)):
        assert sorted(r for g in groups for r in g) == list(range(world))
        assert all(len(g) == size and g == sorted(g) for g in groups)
    assert all(len(set(a) & set(b)) <= 1 for a in d.ep_ranks() for b in d.sp_ranks())
    for g in d.expt_dp_ranks():
        assert len({next(e.index(r) for e in d.ep_ranks() if r in e) for r in g}) == 1
    assert all(d.coords(r)["ep"] == next(g.index(r) for g in d.ep_ranks() if r in g)
               for r in range(world))


def test_the_other_layouts():
    assert ParallelDims(4, 2, 2, "sp-inner").sp_ranks() == [[0, 1], [2, 3]]
    assert ParallelDims(4, 2, 2, "sp-inner").ep_ranks() == [[0, 2], [1, 3]]
    d = ParallelDims(4, 2, 1, "dp-inner")
    assert d.ep_ranks() == [[0, 2], [1, 3]] and d.expt_dp_ranks() == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="--rank-layout"):
        ParallelDims(4, 2, 1, "outer").validate()


def test_auto_keeps_per_layer_groups_inside_nodes():
    from dice_ds.parallel.dims import choose_order

    block, cyclic = ["a", "a", "b", "b"], ["a", "b", "a", "b"]
    # one host, or a tie: the default layout (golden fixtures)
    assert choose_order(ParallelDims(4, 2, 2), "auto", ["h"] * 4)[0].order == "ep-inner"
    assert choose_order(ParallelDims(4, 2, 2), "auto", block)[0].order == "ep-inner"  # one crosses
    assert choose_order(ParallelDims(4), "auto", block)[0].order == "ep-inner"
    # ranks spread over the nodes round robin (slurm --distribution=cyclic): EP strides to stay in
    dims, why = choose_order(ParallelDims(4, 2), "auto", cyclic)
    assert dims.order == "dp-inner" and dims.layout(cyclic)["crossing_nodes"]["ep"] == []
    assert "EP 0 of 4" in why
    dims, why = choose_order(ParallelDims(4, 1, 2), "auto", cyclic)
    assert dims.order == "dp-inner" and dims.layout(cyclic)["crossing_nodes"]["sp"] == []
    # 2 nodes of 4, EP 4 x SP 2: EP inside the nodes and SP across, or the other way round:
    # as many ranks cross either way, so ep-inner
    assert choose_order(ParallelDims(8, 4, 2), "auto", ["a"] * 4 + ["b"] * 4)[0].order == "ep-inner"
    # the setting wins over the hosts
    dims, why = choose_order(ParallelDims(4, 2), "dp-inner", block)
    assert dims.order == "dp-inner" and why == "--rank-layout dp-inner"
    assert dims.layout(block)["crossing_nodes"]["ep"] == [[0, 2], [1, 3]]
