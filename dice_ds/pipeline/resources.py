"""Resources checked before a pipeline is built: the memory its plan needs against the memory this
machine has.

Owns ``check_memory`` (one ``ConfigError`` line naming the numbers, the flags that lower them and
the override, ``--skip-memory-check`` / ``skip_memory_check=True``), ``planned_bytes`` (bytes per
rank as ``dice-ds plan`` counts them: dice_ds/plan/memory.py's weights, activations and caches of
the run's model, batch, dtype and parallel plan) and ``available_bytes`` (what this machine can
give: ``MemAvailable`` of /proc/meminfo, or the cgroup's limit minus its usage when lower; on
CUDA the device's total memory).

On the CPU the ranks of one node share its memory, so the check compares the per-rank plan times
the node's ranks (``dice_ds.runenv.local_world_size``) with what is available. The weights are
counted first and alone when they already exceed it, so a huge ``--depth`` is refused in
microseconds, without building the schedule the caches are counted on. The plan's numbers are
estimates of what the run holds at its peak (docs/plan.md, docs/scale.md); the interpreter,
torch and megatron themselves (about 1 GB per process) are not in them, so a run refused here
would not fit, and one that passes may still be tight.
"""

from __future__ import annotations

import os

import torch

from dice_ds.config import ConfigError
from dice_ds.options import steps_of
from dice_ds.plan.memory import dense_params, expert_params, memory
from dice_ds.runenv import local_world_size
from dice_ds.schedule import Schedule
from dice_ds.workload import DTYPE_BYTES, Workload

_CGROUP_V2 = "/sys/fs/cgroup"
_CGROUP_V1 = "/sys/fs/cgroup/memory"
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2^63


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2's "max": no limit


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _cgroup_headroom(root_v2: str = _CGROUP_V2, root_v1: str = _CGROUP_V1) -> int | None:
    """The cgroup's limit minus its usage (v2, else v1), or None without a limit."""
    for limit_file, usage_file in ((os.path.join(root_v2, "memory.max"),
                                    os.path.join(root_v2, "memory.current")),
                                   (os.path.join(root_v1, "memory.limit_in_bytes"),
                                    os.path.join(root_v1, "memory.usage_in_bytes"))):
        limit = _read_int(limit_file)
        if limit is not None and limit < _UNLIMITED:
            return max(0, limit - (_read_int(usage_file) or 0))
    return None


def available_bytes(device: str) -> tuple[int | None, str]:
    """(bytes this machine can give a run, what they are), or (None, why not known)."""
    if device == "cuda":
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        return torch.cuda.get_device_properties(index).total_memory, "the GPU's memory"
    known = {name: value for name, value in (("MemAvailable", _meminfo_available()),
                                             ("the cgroup's limit", _cgroup_headroom()))
             if value is not None}
    if not known:
        return None, "no /proc/meminfo or cgroup limit"
    name = min(known, key=known.get)
    return known[name], f"{name} of this machine"


def _workload(opts, cfg) -> Workload:
    return Workload(cfg=cfg, images_per_rank=opts.per_proc_batch_size,
                    cfg_guidance=opts.cfg_scale > 1, steps=steps_of(opts), dtype=opts.dtype)


def weight_bytes(opts, cfg, plan, replicas: int = 0) -> float:
    """Parameter bytes per rank: ``memory``'s ``expert_weights + dense_weights`` (routed experts
    split over the EP group, plus ``replicas`` expert slots per layer), without the per-layer
    schedule its caches need."""
    experts = expert_params(cfg, plan.ep_size, replicas)
    return float((experts + dense_params(cfg)) * DTYPE_BYTES[opts.dtype])


def planned_bytes(opts, cfg, plan, replicas: int = 0) -> dict[str, float]:
    """The plan's memory column for this run (dice_ds/plan/memory.py), bytes per rank."""
    sched = Schedule.build(plan, steps_of(opts), cfg.depth)
    return memory(_workload(opts, cfg), sched, plan.ep_size, plan.sp_size, plan.payload_dtype,
                  replicas)


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def check_memory(opts, cfg, plan, device: str, replicas: int = 0) -> None:
    """Refuse a run whose planned memory exceeds what this machine has (module docstring);
    ``replicas``: extra expert slots per rank and layer (an expert placement's)."""
    if opts.skip_memory_check:
        return
    available, what = available_bytes(device)
    if available is None:
        return
    ranks = 1 if device == "cuda" else local_world_size()
    weights = weight_bytes(opts, cfg, plan, replicas)
    if weights * ranks <= available:  # the weights fit: count the rest (needs the schedule)
        total = sum(planned_bytes(opts, cfg, plan, replicas).values())
        if total * ranks <= available:
            return
        needed, parts = total, "weights, activations and caches"
    else:
        needed, parts = weights, "weights alone"
    on = f" x {ranks} ranks on this node" if ranks > 1 else ""
    lower = ["--ep (experts split over the ranks)" if plan.ep_size == 1 else
             "a larger --ep-size", "--dtype bf16" if opts.dtype == "fp32" else None,
             "a smaller --per-proc-batch-size" if parts != "weights alone" else None,
             "more ranks (nodes)", "a smaller --depth" if opts.depth else None,
             "fewer --expert-replicas" if replicas else None]
    raise ConfigError(f"the run needs {_gib(needed)} per rank ({parts}, as dice-ds plan counts "
                      f"them){on} but {what} is {_gib(available)}: lower it with "
                      f"{', '.join(x for x in lower if x)}, or pass --skip-memory-check")
