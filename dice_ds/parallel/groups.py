"""Process groups: starting torch.distributed and the explicit group collection handed to the model.

Owns: ``init_distributed`` (torchrun / deepspeed launcher / slurm environment, or a 1-rank gloo world
for a plain ``python`` run: megatron's linear layers need an initialised default group even alone)
and ``ModelGroups``, the one object that carries every group the model uses. Modules never call a
global group getter; they receive a ``ProcessGroupCollection`` built from ``ModelGroups``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=int(os.environ.get("DICE_DS_PG_TIMEOUT_MIN", "30")))


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
                     rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Start the default process group once; return (rank, world_size).

    Reads the launcher's environment; with none, starts a 1-rank gloo group on an in-memory store.
    ``init_method``/``rank``/``world_size`` override the environment (tests use a file store).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = default_backend(device)
    if init_method is not None:
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=DEFAULT_TIMEOUT)
    else:
        env = _env_rank_world()
        if env is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=DEFAULT_TIMEOUT)
        else:
            r, w = env
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend, init_method="env://", rank=r, world_size=w,
                                    timeout=DEFAULT_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def _subgroups_of(size: int, contiguous: bool) -> list[list[int]]:
    world = dist.get_world_size()
    if contiguous:
        return [list(range(s, s + size)) for s in range(0, world, size)]
    stride = size and world // size
    return [list(range(s, world, stride)) for s in range(stride)]


def _new_group_containing_me(rank_lists: list[list[int]]) -> dist.ProcessGroup:
    """Create every group in ``rank_lists`` (a collective: all ranks call it) and return mine."""
    me = dist.get_rank()
    mine = None
    for ranks in rank_lists:
        g = dist.new_group(ranks)
        if me in ranks:
            mine = g
    assert mine is not None
    return mine


@dataclass
class ModelGroups:
    """Every process group the model uses; built once, passed explicitly."""

    ep: dist.ProcessGroup
    """Expert-parallel group (size ep_size; experts are sharded across it)."""
    expt_dp: dist.ProcessGroup
    """Ranks holding the same experts (size world / ep_size)."""
    single: dist.ProcessGroup
    """A group of this rank alone: tensor/context parallel dimensions are 1."""

    @property
    def ep_size(self) -> int:
        return self.ep.size()

    @property
    def ep_rank(self) -> int:
        return self.ep.rank()

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


def build_model_groups(ep_size: int = 1) -> ModelGroups:
    """Collective: build EP groups of ``ep_size`` contiguous ranks (EP inside DP groups)."""
    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    single = _new_group_containing_me([[r] for r in range(world)])
    ep = single if ep_size == 1 else _new_group_containing_me(_subgroups_of(ep_size, True))
    expt_dp_ranks = [list(range(s, world, ep_size)) for s in range(ep_size)]
    expt_dp = _new_group_containing_me(expt_dp_ranks)
    return ModelGroups(ep=ep, expt_dp=expt_dp, single=single)


def local_model_groups() -> ModelGroups:
    """Groups for a model that runs alone on this rank (DP, or a single process)."""
    return build_model_groups(1)
