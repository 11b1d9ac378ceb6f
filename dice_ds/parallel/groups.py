"""Process groups: starting torch.distributed and building every group of a run, once.

Owns ``init_distributed`` (torchrun / deepspeed launcher / slurm environment, or a 1-rank gloo world
for a plain ``python`` run: megatron's linear layers need an initialised default group even alone)
and ``build_groups(dims)``, the one builder: from a ``ParallelDims`` (``dice_ds/parallel/dims.py``:
the one size check and the rank lists) it creates, in one collective call, every group a run uses
and returns them as ``ModelGroups``, passed explicitly (modules never call a global group getter;
megatron's layers get a ``ProcessGroupCollection`` made from it by ``dice_ds.mcore.process_groups``).
Every group is a ``torch.distributed.new_group``; DeepSpeed is not used (its launcher only sets the
environment that ``init_distributed`` reads).

Layout: ``ParallelDims`` owns the rank lists (``dice_ds/parallel/dims.py``: ``ep-inner``, EP
innermost, SP next, DP outermost, is the default on one host; ``sp-inner`` and ``dp-inner`` order
the dimensions otherwise, and ``dice_ds/parallel/topology.py`` chooses one on the ranks' hosts).
``ep-inner``, world 4, ep 2, sp 2: EP [0,1] [2,3], expt-DP [0,2] [1,3], SP [0,2] [1,3]. Inside an
EP group megatron places experts contiguously by group rank (increasing global rank): EP rank k
holds global experts [k·E/ep, (k+1)·E/ep).

Timeout (bounded failure): one value, ``pg_timeout_seconds`` (``dice_ds/parallel/timeout.py``:
``--pg-timeout``, else ``$DICE_DS_PG_TIMEOUT`` seconds, else the legacy ``$DICE_DS_PG_TIMEOUT_MIN``
minutes, else 300 s),
is fixed by ``init_distributed`` and applies to EVERY group of the run: the default group and each
``new_group`` here. A collective whose peer is stopped raises after that time; one whose peer died
usually raises at once (gloo: connection closed).

Teardown: a default group that ``init_distributed`` started is destroyed at interpreter exit
(``_destroy_at_exit``, registered once when it starts one), unless the caller destroyed it first. A
gloo group left to the C++ destructors at exit can abort a finished process ("terminate called
without an active exception", seen under torchrun on a user's script that ends without
``destroy_process_group``, tests/multirank/test_diffusers_example.py). A group the caller started
is the caller's to destroy.

Invariant: ``build_groups`` is a collective: all ranks of the world call it, with the same
arguments, in the same order; it creates the groups in one fixed order (single-rank, EP, expert-DP,
EP counts, SP).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from dice_ds.config import ConfigError
from dice_ds.launch_env import env_rank_world
from dice_ds.parallel.dims import ParallelDims
from dice_ds.parallel.timeout import pg_timeout_seconds
from dice_ds.patches.torch_elastic import attempt_store

_timeout: timedelta | None = None
"""The run's collective timeout, fixed by ``init_distributed`` (read by every group creation)."""


def group_timeout() -> timedelta:
    """The timeout every group of this run is created with (the default before ``init_distributed``)."""
    return _timeout if _timeout is not None else timedelta(seconds=pg_timeout_seconds())


def _new_group(ranks) -> dist.ProcessGroup:
    return dist.new_group(list(ranks), timeout=group_timeout())


def _destroy_at_exit() -> None:
    """The at-exit teardown of the default group ``init_distributed`` started (module docstring)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def default_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: torch.device | str = "cpu", init_method: str | None = None,
                     rank: int | None = None, world_size: int | None = None,
                     timeout: float | None = None) -> tuple[int, int]:
    """Start the default process group once; return (rank, world_size).

    Reads the launcher's environment; with none, starts a 1-rank gloo group on an in-memory store.
    ``init_method``/``rank``/``world_size`` override the environment (tests use a file store).
    ``timeout``: seconds (``pg_timeout_seconds``); it becomes the timeout of every later group.
    """
    global _timeout
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    _timeout = timedelta(seconds=pg_timeout_seconds(timeout))
    backend = default_backend(device)
    if init_method is not None:
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=_timeout)
    else:
        env = env_rank_world()
        if env is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=_timeout)
        else:
            r, w = env
            os.environ.setdefault("MASTER_PORT", "29500")
            store = attempt_store(_timeout)  # torchrun restarts: patches/torch_elastic.py
            if store is not None:
                dist.init_process_group(backend, store=store, rank=r, world_size=w,
                                        timeout=_timeout)
            else:
                dist.init_process_group(backend, init_method="env://", rank=r, world_size=w,
                                        timeout=_timeout)
    atexit.unregister(_destroy_at_exit)  # once, however often a group is started and destroyed
    atexit.register(_destroy_at_exit)
    return dist.get_rank(), dist.get_world_size()


def _new_group_containing_me(rank_lists: list[list[int]]) -> dist.ProcessGroup:
    """Create every group in ``rank_lists`` (a collective: all ranks call it) and return mine."""
    me = dist.get_rank()
    mine = None
    for ranks in rank_lists:
        g = _new_group(ranks)
        if me in ranks:
            mine = g
    assert mine is not None
    return mine


@dataclass(frozen=True)
class ModelGroups:
    """Every process group of a run, built once by ``build_groups`` and passed explicitly."""

    dims: ParallelDims
    """The sizes these groups were built for (world, ep, sp)."""
    single: dist.ProcessGroup
    """A group of this rank alone: tensor/context parallel dimensions are 1."""
    ep: dist.ProcessGroup
    """Expert-parallel group (size ep; experts are sharded across it); ``single`` when ep is 1,
    so that megatron short-circuits every EP collective."""
    expt_dp: dist.ProcessGroup
    """Ranks holding the same experts (size world / ep)."""
    ep_counts: Optional[dist.ProcessGroup] = None
    """Same members as ``ep`` (ep > 1): the count exchange of stale calls, on its own group so it
    never waits behind payload on ``ep`` (docs/design.md "Exchange schedule")."""
    sp: Optional[dist.ProcessGroup] = None
    """This rank's sequence-parallel group (sp > 1; ``dice_ds.parallel.sp``)."""

    @property
    def ep_size(self) -> int:
        return self.ep.size()

    @property
    def ep_rank(self) -> int:
        return self.ep.rank()

    def describe(self) -> dict:
        """Global ranks of this rank's groups (JSON-able, for run.json and logs)."""
        out = {
            "ep_size": self.ep_size,
            "ep_rank": self.ep_rank,
            "ep_ranks": dist.get_process_group_ranks(self.ep),
            "expt_dp_ranks": dist.get_process_group_ranks(self.expt_dp),
        }
        if self.sp is not None:
            out["sp_ranks"] = dist.get_process_group_ranks(self.sp)
        return out


def build_groups(dims: ParallelDims) -> ModelGroups:
    """Collective: validate ``dims`` against the started world and create every group of the run
    (module docstring: layout, order, timeout)."""
    world = dist.get_world_size()
    if dims.world != world:
        raise ConfigError(f"the parallel sizes were planned for {dims.world} ranks but the world "
                          f"has {world}: start as many ranks as the plan's world size")
    dims.validate()
    single = _new_group_containing_me([[r] for r in range(world)])
    ep = single if dims.ep == 1 else _new_group_containing_me(dims.ep_ranks())
    expt_dp = _new_group_containing_me(dims.expt_dp_ranks())
    # same members as ep: stale count exchanges never queue behind payload
    counts = _new_group_containing_me(dims.ep_ranks()) if dims.ep_enabled else None
    sp = _new_group_containing_me(dims.sp_ranks()) if dims.sp_enabled else None
    return ModelGroups(dims=dims, single=single, ep=ep, expt_dp=expt_dp, ep_counts=counts, sp=sp)


def local_model_groups() -> ModelGroups:
    """Groups for a model that runs alone on this rank (DP, or a single process): ``build_groups``
    with ep and sp 1 (a collective like it)."""
    return build_groups(ParallelDims(dist.get_world_size()))
