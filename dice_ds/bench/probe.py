"""Communication-only measurements for ``dice-ds bench``: the link, without the model's compute.

``python -m dice_ds.bench.probe --bytes-per-call B --calls N --out F`` (W ranks, launcher
environment). Three measurements, all with exchanges in which every rank sends B bytes to the other
ranks, B / (W - 1) to each (and as much to itself, as an EP all-to-all does), all at once:

1. **pipelined** (T_comm of the bench): N ``all_to_all_single`` posted back to back with up to
   ``--window`` in flight. The seconds from the first post to the last completion (after a barrier
   and one warm-up exchange), max over ranks. ``throughput_bits`` = 8 B N / seconds (per rank and
   direction). Also what the exchanges cost the CPU (the CPU-aware bound of docs/benchmarks.md):
   ``cpu_seconds_rank`` = each rank's own user + system seconds (all its threads: gloo's too) over
   the measurement, and ``cpu_seconds_machine`` = busy seconds of the whole machine from /proc/stat
   (user, system, irq and softirq of every core: the kernel's TCP, bridge and shaping work is not
   always charged to a process), both minus nothing: the probe is the only work running.
   ``cpu_per_byte`` = machine seconds / W / B N (one rank's share per byte it sends).
2. **lone** (``--lone-calls``): blocking exchanges one after another, nothing queued behind any of
   them: what a sync call's all-to-all gets. ``lone_throughput_bits`` per direction.
3. **lone gather** (``--gather-bytes G``, optional): blocking ``all_gather`` of G bytes per rank
   (sync SP's K/V exchange), ``gather_throughput_bits`` per direction.
These calibrate the emulated link of ``dice-ds plan --validate`` (``dice_ds.plan.validate``,
docs/plan.md "Link"); only (1) enters the bench's own bound. Rank 0 writes one JSON object to F.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    """What a bench ran on, for ``dice-ds plan`` to tell a calibration from another machine
    (``dice_ds/plan/machine.py``): the CPU model (/proc/cpuinfo's first 'model name', None where
    unreadable) and the cores this process may use."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), None)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "cores": cores}


def cpu_marks() -> tuple[float | None, float]:
    """(machine busy seconds, CPU seconds of this process's reaped children) now: the two clocks
    ``foreign_cpu`` compares over one bench run."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy_seconds(), ru.ru_utime + ru.ru_stime


def foreign_cpu(before: tuple[float | None, float]) -> dict:
    """CPU the machine spent during one run (since ``before = cpu_marks()``) beyond the run's own
    processes (the bench's children, reaped: every rank and its gloo threads): other work that
    competed with the ranks for the cores. ``own`` and ``foreign`` in seconds (None where
    /proc/stat cannot be read); the kernel's network work for the ranks is not charged to them
    and shows up as a small foreign share even on a quiet machine."""
    busy0, own0 = before
    busy1, own1 = cpu_marks()
    own = own1 - own0
    foreign = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - own)
    return {"own": own, "foreign": foreign}


def own_cpu_per_byte(probe: dict) -> float | None:
    """A rank's own CPU seconds (``cpu_seconds_rank``, mean over ranks) per byte it sent in the
    pipelined measurement of a probe record; None where the probe did not measure it."""
    own = probe.get("cpu_seconds_rank")
    moved = probe.get("bytes_per_call", 0) * probe.get("calls", 0)
    return sum(own) / len(own) / moved if own and moved else None


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _clock(fn, cpu: dict | None = None) -> float:
    """Seconds of ``fn()`` on the slowest rank (all start after a barrier); with ``cpu``, also
    fills in the CPU seconds it cost (every rank's own, and the machine's busy seconds)."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    busy0, own0 = busy_seconds(), _own_cpu()
    t0 = time.perf_counter()
    fn()
    mine = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    if cpu is not None:
        busy1 = busy_seconds()
        own = torch.zeros(dist.get_world_size(), dtype=torch.float64)
        own[dist.get_rank()] = _own_cpu() - own0
        dist.all_reduce(own)
        cpu["cpu_seconds_rank"] = own.tolist()
        cpu["cpu_seconds_machine"] = (busy1 - busy0) if busy0 is not None and busy1 else None
    return float(mine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="all-to-all link probe (W ranks)")
    p.add_argument("--bytes-per-call", type=int, required=True,
                   help="bytes each rank sends to the other ranks per exchange")
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--lone-calls", type=int, default=0)
    p.add_argument("--gather-bytes", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    n = max(1, args.bytes_per_call // 4 // (world - 1))  # floats to each peer
    nbytes = n * 4 * (world - 1)  # to the other ranks, per call
    send = torch.zeros(n * world, dtype=torch.float32)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)

    def pipelined():
        inflight = []
        for _ in range(args.calls):
            inflight.append(dist.all_to_all_single(recv, send, async_op=True))
            if len(inflight) >= args.window:
                inflight.pop(0).wait()
        for h in inflight:
            h.wait()

    cpu: dict = {}
    seconds = _clock(pipelined, cpu)
    out = {"seconds": seconds, "bytes_per_call": nbytes, "calls": args.calls, "ranks": world,
           "throughput_bits": 8 * nbytes * args.calls / seconds, **cpu,
           "cpu_per_byte": (cpu["cpu_seconds_machine"] / world / (nbytes * args.calls)
                            if cpu.get("cpu_seconds_machine") is not None else None)}
    if args.lone_calls:
        def lone():
            for _ in range(args.lone_calls):
                dist.all_to_all_single(recv, send)

        s = _clock(lone)
        out.update(lone_seconds=s, lone_calls=args.lone_calls,
                   lone_throughput_bits=8 * nbytes * args.lone_calls / s)
    if args.gather_bytes and args.lone_calls:
        g = max(1, args.gather_bytes // 4)
        mine, every = torch.zeros(g), torch.empty(g * world)

        def gather():
            for _ in range(args.lone_calls):
                dist.all_gather_into_tensor(every, mine)

        dist.all_gather_into_tensor(every, mine)
        s = _clock(gather)
        out.update(gather_bytes=g * 4, gather_seconds=s,
                   gather_throughput_bits=8 * g * 4 * (world - 1) * args.lone_calls / s)
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump(out, fh)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
