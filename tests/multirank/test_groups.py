"""Every group of a run from ``build_groups(ParallelDims(world, ep, sp))``: EP, expert-DP, the
single-rank group, the EP counts group and the SP group, all ``torch.distributed.new_group``s.

EP groups are contiguous rank blocks, expert-DP groups join the ranks holding the same experts and
SP groups stride ep inside each block of ep·sp ranks (dice_ds.parallel.groups docstring). Each group
is also exercised with an all_reduce, so a group with the right member list but the wrong
communicator would fail; every group has the run's timeout.
"""
import pytest
import torch

from distributed import run_ranks


def _groups_on_rank(rank, world, sizes):
    import torch.distributed as dist

    from dice_ds.config import ConfigError
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups

    out = {}
    for ep, sp in sizes:
        g = build_groups(ParallelDims(world, ep, sp))
        named = {"ep": g.ep, "expt_dp": g.expt_dp, "single": g.single, "ep_counts": g.ep_counts,
                 "sp": g.sp}
        ranks, sums, timeouts = {}, {}, []
        for name, group in named.items():
            if group is None:
                continue
            x = torch.tensor([float(rank)])
            dist.all_reduce(x, group=group)
            ranks[name], sums[name] = dist.get_process_group_ranks(group), x.item()
            timeouts.append(group._get_backend(torch.device("cpu")).options._timeout)
        timeouts.append(dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout)
        out[(ep, sp)] = dict(g.describe(), ranks=ranks, sums=sums, timeouts=timeouts,
                             ep_is_single=g.ep is g.single)
    for bad in (ParallelDims(world, 3), ParallelDims(world + 1)):
        try:
            build_groups(bad)
        except ConfigError as e:
            out.setdefault("bad", []).append(str(e))
    return out


def _check(results, world, layouts):
    for rank, out in enumerate(results):
        bad_ep, bad_world = out["bad"]
        assert "ep_size=3" in bad_ep and "divide the world size" in bad_ep
        assert f"planned for {world + 1} ranks" in bad_world
        for (ep, sp), layout in layouts.items():
            d = out[(ep, sp)]
            mine = {name: [g for g in groups if rank in g][0] for name, groups in layout.items()}
            expected = dict(mine, single=[rank])
            if ep > 1:
                expected["ep_counts"] = mine["ep"]
            assert d["ranks"] == expected, (ep, sp, rank, d["ranks"])
            assert d["sums"] == {k: float(sum(v)) for k, v in expected.items()}
            assert d["ep_size"] == ep and d["ep_rank"] == mine["ep"].index(rank)
            assert d["ep_ranks"] == mine["ep"] and d["expt_dp_ranks"] == mine["expt_dp"]
            assert d["ep_is_single"] == (ep == 1)  # megatron then short-circuits EP collectives
            assert d.get("sp_ranks") == (mine["sp"] if sp > 1 else None)
            # every group has the run's timeout (default 300 s; torch's new_group default would
            # be 30 minutes)
            assert [t.total_seconds() for t in d["timeouts"]] == [300.0] * len(d["timeouts"])


def test_groups_world4(tmp_path):
    layouts = {(1, 1): dict(ep=[[0], [1], [2], [3]], expt_dp=[[0, 1, 2, 3]]),
               (2, 1): dict(ep=[[0, 1], [2, 3]], expt_dp=[[0, 2], [1, 3]]),
               (4, 1): dict(ep=[[0, 1, 2, 3]], expt_dp=[[0], [1], [2], [3]]),
               (1, 2): dict(ep=[[0], [1], [2], [3]], expt_dp=[[0, 1, 2, 3]], sp=[[0, 1], [2, 3]]),
               (2, 2): dict(ep=[[0, 1], [2, 3]], expt_dp=[[0, 2], [1, 3]], sp=[[0, 2], [1, 3]])}
    _check(run_ranks(_groups_on_rank, 4, tmp_path, tuple(layouts)), 4, layouts)


def test_groups_world2(tmp_path):
    layouts = {(2, 1): dict(ep=[[0, 1]], expt_dp=[[0], [1]])}
    _check(run_ranks(_groups_on_rank, 2, tmp_path, tuple(layouts)), 2, layouts)


def test_pg_timeout_resolution(monkeypatch):
    from dice_ds.config import ConfigError
    from dice_ds.parallel.groups import pg_timeout_seconds

    monkeypatch.delenv("DICE_DS_PG_TIMEOUT", raising=False)
    monkeypatch.delenv("DICE_DS_PG_TIMEOUT_MIN", raising=False)
    assert pg_timeout_seconds() == 300.0 and pg_timeout_seconds(12) == 12.0
    monkeypatch.setenv("DICE_DS_PG_TIMEOUT_MIN", "2")
    assert pg_timeout_seconds() == 120.0
    monkeypatch.setenv("DICE_DS_PG_TIMEOUT", "7.5")
    assert pg_timeout_seconds() == 7.5 and pg_timeout_seconds(3) == 3.0  # the flag wins
    monkeypatch.setenv("DICE_DS_PG_TIMEOUT", "0")
    with pytest.raises(ConfigError, match="DICE_DS_PG_TIMEOUT"):
        pg_timeout_seconds()
