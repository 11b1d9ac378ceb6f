"""EP / expert-DP group membership from both group backends (DeepSpeed and torch.new_group).

EP groups are contiguous rank blocks and expert-DP groups join the ranks holding the same experts
(dice_ds.parallel.groups docstring). Each group is also exercised with an all_reduce, so a group
with the right member list but the wrong communicator would fail.
"""
import pytest
import torch

from distributed import run_ranks


def _groups_on_rank(rank, world, ep_sizes):
    import torch.distributed as dist

    from dice_ds.config import ConfigError
    from dice_ds.parallel.groups import build_model_groups, ep_rank_lists

    out = {}
    for backend in ("torch", "deepspeed"):
        for ep_size in ep_sizes:
            g = build_model_groups(ep_size, group_backend=backend)
            sums = []
            for group in (g.ep, g.expt_dp):
                x = torch.tensor([float(rank)])
                dist.all_reduce(x, group=group)
                sums.append(x.item())
            ep_lists, dp_lists = ep_rank_lists(world, ep_size)
            cpu = torch.device("cpu")
            out[(backend, ep_size)] = dict(g.describe(), sums=sums, backend=g.backend,
                                           timeouts=[pg._get_backend(cpu).options._timeout
                                                     for pg in (dist.group.WORLD, g.ep, g.expt_dp,
                                                                g.single)],
                                           expected=([e for e in ep_lists if rank in e][0],
                                                     [d for d in dp_lists if rank in d][0]))
    try:
        build_model_groups(3)
    except ConfigError as e:
        out["bad"] = str(e)
    return out


def _check(results, world, ep_sizes, expected_layout):
    for rank, out in enumerate(results):
        assert "ep_size=3" in out["bad"] and "divide the world size" in out["bad"]
        for backend in ("torch", "deepspeed"):
            for ep_size in ep_sizes:
                d = out[(backend, ep_size)]
                ep, dp = expected_layout[ep_size]
                my_ep = [g for g in ep if rank in g][0]
                my_dp = [g for g in dp if rank in g][0]
                assert d["backend"] == backend
                assert d["ep_size"] == ep_size and d["ep_rank"] == my_ep.index(rank)
                assert d["ep_ranks"] == my_ep and d["expt_dp_ranks"] == my_dp, (backend, ep_size, rank)
                assert list(d["expected"]) == [my_ep, my_dp]
                assert d["sums"] == [float(sum(my_ep)), float(sum(my_dp))]
                # every group has the run's timeout (default 300 s), DeepSpeed's included (torch's
                # new_group default would be 30 minutes)
                assert [t.total_seconds() for t in d["timeouts"]] == [300.0] * 4, (backend, d)


def test_groups_world4(tmp_path):
    layout = {1: ([[0], [1], [2], [3]], [[0, 1, 2, 3]]),
              2: ([[0, 1], [2, 3]], [[0, 2], [1, 3]]),
              4: ([[0, 1, 2, 3]], [[0], [1], [2], [3]])}
    _check(run_ranks(_groups_on_rank, 4, tmp_path, (1, 2, 4)), 4, (1, 2, 4), layout)


def test_groups_world2(tmp_path):
    layout = {2: ([[0, 1]], [[0], [1]])}
    _check(run_ranks(_groups_on_rank, 2, tmp_path, (2,)), 2, (2,), layout)


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


def test_unknown_group_backend_is_config_error(tmp_path):
    from dice_ds.config import ConfigError
    from dice_ds.parallel.groups import build_model_groups, init_distributed

    init_distributed("cpu")
    with pytest.raises(ConfigError, match="group_backend"):
        build_model_groups(1, group_backend="mpi")
