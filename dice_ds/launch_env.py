"""What the launcher announced: rank and world size from the environment, read in one place.

Owns reading ``RANK`` / ``WORLD_SIZE`` (torchrun, the DeepSpeed launcher) and ``SLURM_PROCID`` /
``SLURM_NTASKS`` (srun, with ``MASTER_ADDR`` set) for every reader: the CLI's checks before any
heavy import (dice_ds/sample/entry.py), the pipeline's world size (dice_ds/pipeline/prepare.py)
and ``init_distributed`` (dice_ds/parallel/groups.py). A value that is not an integer in range is
one ``ConfigError`` line naming the variable, never a traceback. Imports nothing heavy.
"""

from __future__ import annotations

import os

from dice_ds.config import ConfigError


def env_count(key: str, minimum: int) -> int:
    """The launcher's ``key`` as an integer >= ``minimum``; else one ConfigError line."""
    text = os.environ[key]
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"environment {key}={text!r} must be an integer >= {minimum} (set by the "
                          f"launcher: torchrun, deepspeed, srun); unset it to run one process")
    return value


def env_rank_world() -> tuple[int, int] | None:
    """(rank, world size) from torchrun/deepspeed (RANK, WORLD_SIZE) or slurm (SLURM_PROCID,
    SLURM_NTASKS with MASTER_ADDR); None when no launcher set them."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = env_count("RANK", 0), env_count("WORLD_SIZE", 1)
    elif all(k in os.environ for k in ("SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR")):
        rank, world = env_count("SLURM_PROCID", 0), env_count("SLURM_NTASKS", 1)
    else:
        return None
    if rank >= world:
        raise ConfigError(f"environment: rank {rank} is not below the world size {world} (set by "
                          "the launcher); unset RANK/WORLD_SIZE to run one process")
    return rank, world


def env_world_size() -> int:
    """World size announced by the launcher (torchrun/deepspeed ``WORLD_SIZE``, slurm), else 1."""
    if "WORLD_SIZE" in os.environ:
        return env_count("WORLD_SIZE", 1)
    if "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        return env_count("SLURM_NTASKS", 1)
    return 1


def env_rank() -> int:
    """This process's rank as the launcher announced it, else 0."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return env_count(key, 0)
    return 0
