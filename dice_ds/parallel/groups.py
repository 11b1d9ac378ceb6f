"""Process groups: starting torch.distributed and the explicit group collection handed to the model.

Owns: ``init_distributed`` (torchrun / deepspeed launcher / slurm environment, or a 1-rank gloo world
for a plain ``python`` run: megatron's linear layers need an initialised default group even alone)
and ``ModelGroups``, the one object that carries every group the model uses, built by
``build_model_groups``. Modules never call a global group getter; they receive a
``ProcessGroupCollection`` built from ``ModelGroups``.

Layout (EP inside DP; identical for both group backends): with world W and EP size e, the EP groups
are the contiguous blocks [0, e), [e, 2e), ...; the expert-data-parallel groups join the ranks that
hold the same experts, {r, r + e, r + 2e, ...}. World 4, EP 2: ep [0,1] [2,3], expt_dp [0,2] [1,3].
Inside an EP group, megatron places experts contiguously: EP rank k holds global experts
[k·E/e, (k+1)·E/e).

Group backends: 'deepspeed' creates the EP / expert-DP groups with DeepSpeed's
``groups._create_expert_and_data_parallel`` (on the existing torch default group; its shm-op JIT
build is stubbed by ``dice_ds.patches.deepspeed_cpu``); 'torch' creates the same groups with
``torch.distributed.new_group``. Both return plain ``torch.distributed.ProcessGroup``s.

Timeout (bounded failure): one value, ``pg_timeout_seconds`` (``--pg-timeout``, else
``$DICE_DS_PG_TIMEOUT`` seconds, else the legacy ``$DICE_DS_PG_TIMEOUT_MIN`` minutes, else 300 s),
is fixed by ``init_distributed`` and applies to EVERY group of the run: the default group, each
``new_group`` here and the groups DeepSpeed creates (its ``new_group`` passes no timeout, which in
torch means 30 minutes, so ``_deepspeed_expert_groups`` routes DeepSpeed's group creation through
``_new_group`` with the run's timeout; same layout). A collective whose peer is stopped raises
after that time; one whose peer died usually raises at once (gloo: connection closed).

Invariant: every function that creates groups is a collective: all ranks of the world call it, with
the same arguments, in the same order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from dice_ds.config import ConfigError

DEFAULT_TIMEOUT_SECONDS = 300.0
GROUP_BACKENDS = ("deepspeed", "torch")
_timeout: timedelta | None = None
"""The run's collective timeout, fixed by ``init_distributed`` (read by every group creation)."""


def pg_timeout_seconds(seconds: float | None = None) -> float:
    """The collective timeout: ``seconds`` (``--pg-timeout``), else ``$DICE_DS_PG_TIMEOUT`` (s), else
    ``$DICE_DS_PG_TIMEOUT_MIN`` (minutes, legacy), else 300 s."""
    if seconds is not None:
        value, where = float(seconds), "--pg-timeout"
    elif os.environ.get("DICE_DS_PG_TIMEOUT"):
        value, where = float(os.environ["DICE_DS_PG_TIMEOUT"]), "DICE_DS_PG_TIMEOUT"
    elif os.environ.get("DICE_DS_PG_TIMEOUT_MIN"):
        value, where = 60.0 * float(os.environ["DICE_DS_PG_TIMEOUT_MIN"]), "DICE_DS_PG_TIMEOUT_MIN"
    else:
        return DEFAULT_TIMEOUT_SECONDS
    if value <= 0:
        raise ConfigError(f"{where} must be a positive number of seconds, got {value:g}")
    return value


def group_timeout() -> timedelta:
    """The timeout every group of this run is created with (the default before ``init_distributed``)."""
    return _timeout if _timeout is not None else timedelta(seconds=pg_timeout_seconds())


def _new_group(ranks) -> dist.ProcessGroup:
    return dist.new_group(list(ranks), timeout=group_timeout())


def _env_rank_world() -> tuple[int, int] | None:
    """Rank and world size from torchrun/deepspeed (RANK, WORLD_SIZE) or slurm (SLURM_PROCID)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return None


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
        env = _env_rank_world()
        if env is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=_timeout)
        else:
            r, w = env
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend, init_method="env://", rank=r, world_size=w,
                                    timeout=_timeout)
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


def ep_rank_lists(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(EP groups, expert-DP groups) as rank lists: contiguous EP blocks, strided expert-DP."""
    ep = [list(range(s, s + ep_size)) for s in range(0, world_size, ep_size)]
    expt_dp = [list(range(s, world_size, ep_size)) for s in range(ep_size)]
    return ep, expt_dp


@dataclass
class ModelGroups:
    """Every process group the model uses; built once, passed explicitly."""

    ep: dist.ProcessGroup
    """Expert-parallel group (size ep_size; experts are sharded across it)."""
    expt_dp: dist.ProcessGroup
    """Ranks holding the same experts (size world / ep_size)."""
    single: dist.ProcessGroup
    """A group of this rank alone: tensor/context parallel dimensions are 1."""
    backend: str = field(default="torch")
    """Which library created ``ep`` / ``expt_dp``: 'deepspeed' or 'torch'."""
    ep_counts: Optional[dist.ProcessGroup] = None
    """Same members as ``ep`` (EP > 1): the count exchange of stale calls, on its own group so it
    never waits behind payload on ``ep`` (docs/design.md "Exchange schedule")."""

    @property
    def ep_size(self) -> int:
        return self.ep.size()

    @property
    def ep_rank(self) -> int:
        return self.ep.rank()

    def describe(self) -> dict:
        """Global ranks of this rank's groups (JSON-able, for run.json and logs)."""
        return {
            "group_backend": self.backend,
            "ep_size": self.ep_size,
            "ep_rank": self.ep_rank,
            "ep_ranks": dist.get_process_group_ranks(self.ep),
            "expt_dp_ranks": dist.get_process_group_ranks(self.expt_dp),
        }

    def pg_collection(self):
        """megatron-core ``ProcessGroupCollection`` for a MoE layer."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg = ProcessGroupCollection()
        for name in ("tp", "cp", "tp_cp", "expt_tp", "tp_dp_cp", "dp", "dp_cp"):
            setattr(pg, name, self.single)
        pg.ep = self.ep
        pg.tp_ep = self.ep
        pg.expt_dp = self.expt_dp
        return pg


def default_group_backend() -> str:
    """'deepspeed' when DeepSpeed is importable, else 'torch'."""
    return "deepspeed" if importlib.util.find_spec("deepspeed") is not None else "torch"


def _torch_expert_groups(ep_size: int, single: dist.ProcessGroup
                         ) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    ep_lists, dp_lists = ep_rank_lists(dist.get_world_size(), ep_size)
    ep = single if ep_size == 1 else _new_group_containing_me(ep_lists)
    return ep, _new_group_containing_me(dp_lists)


@contextlib.contextmanager
def _deepspeed_groups_with_timeout():
    """DeepSpeed's ``new_group(ranks)`` takes no timeout (torch then uses 30 minutes): while DeepSpeed
    creates its groups, its backend object creates them with the run's timeout instead."""
    import sys

    cdb = sys.modules["deepspeed.comm.comm"].cdb
    saved = cdb.__dict__.get("new_group")
    cdb.new_group = _new_group
    try:
        yield
    finally:
        if saved is None:
            del cdb.new_group
        else:
            cdb.new_group = saved


def _deepspeed_expert_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """DeepSpeed's expert / expert-data-parallel groups on the existing torch default group.

    DeepSpeed caches them by name (``ep_size_{n}``) in module globals, so a second call with the
    same size returns the same groups on every rank (and creates none, on every rank alike).
    """
    from dice_ds.patches.deepspeed_cpu import apply_deepspeed_cpu_patches

    apply_deepspeed_cpu_patches()
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups as ds_groups

    # wraps the initialised torch default group (no new rendezvous): DeepSpeed's cdb short-circuit
    ds_comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False,
                             verbose=False)
    name = f"ep_size_{ep_size}"
    with _deepspeed_groups_with_timeout():
        ds_groups._create_expert_and_data_parallel(ep_size)
    return (ds_groups._get_expert_parallel_group(name),
            ds_groups._get_expert_data_parallel_group(name))


def build_model_groups(ep_size: int = 1, group_backend: str | None = None) -> ModelGroups:
    """Collective: EP groups of ``ep_size`` contiguous ranks (EP inside DP groups).

    ``group_backend``: 'deepspeed' or 'torch' (None: 'deepspeed' when importable). Both give the
    same rank layout (module docstring).
    """
    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ConfigError(f"ep_size={ep_size} (--ep-size) must divide the world size {world}")
    backend = group_backend or default_group_backend()
    if backend not in GROUP_BACKENDS:
        raise ConfigError(f"group_backend={backend!r}: use one of {GROUP_BACKENDS}")
    single = _new_group_containing_me([[r] for r in range(world)])
    if backend == "deepspeed":
        ep, expt_dp = _deepspeed_expert_groups(ep_size)
    else:
        ep, expt_dp = _torch_expert_groups(ep_size, single)
    if ep_size == 1:
        ep = single  # identical membership; megatron then short-circuits every EP collective
        counts = None
    else:  # same members as ep: stale count exchanges never queue behind payload
        counts = _new_group_containing_me(ep_rank_lists(world, ep_size)[0])
    return ModelGroups(ep=ep, expt_dp=expt_dp, single=single, backend=backend,
                       ep_counts=counts)


def local_model_groups() -> ModelGroups:
    """Groups for a model that runs alone on this rank (DP, or a single process).

    Collective like ``build_model_groups``; uses the 'torch' backend (nothing is sharded, so
    DeepSpeed would add only its import time).
    """
    return build_model_groups(1, group_backend="torch")


def sp_rank_lists(world_size: int, ep_size: int, sp_size: int) -> list[list[int]]:
    """Sequence-parallel groups as rank lists: SP strides over the contiguous EP blocks.

    Rank r = (d·sp_size + s)·ep_size + e (EP innermost, SP next, data parallel outermost), so an
    SP group is {base + s·ep_size : s < sp_size}. SP only (ep 1): contiguous blocks; world 4, ep 2,
    sp 2 (the 2x2 mesh): SP [0,2] [1,3] next to EP [0,1] [2,3].
    """
    block = ep_size * sp_size
    if sp_size < 1 or world_size % block:
        raise ConfigError(f"sp_size={sp_size} (--sp) times ep_size={ep_size} (--ep-size) must "
                          f"divide the world size {world_size}")
    return [[d * block + s * ep_size + e for s in range(sp_size)]
            for d in range(world_size // block) for e in range(ep_size)]


def build_sp_group(ep_size: int, sp_size: int) -> dist.ProcessGroup | None:
    """Collective: this rank's sequence-parallel group (None when sp_size is 1)."""
    if sp_size == 1:
        return None
    return _new_group_containing_me(sp_rank_lists(dist.get_world_size(), ep_size, sp_size))
