"""Communication-only measurements for ``dice-ds bench``: the link, without the model's compute.

``python -m dice_ds.bench.probe --bytes-per-call B --calls N --out F`` (2 ranks, launcher
environment). Four measurements, all with exchanges that send B bytes to the other rank (and B to
itself, as an EP all-to-all does), both directions at once:

1. **pipelined** (T_comm of the bench): N ``all_to_all_single`` posted back to back with up to
   ``--window`` in flight. The seconds from the first post to the last completion (after a barrier
   and one warm-up exchange), max over ranks. ``throughput_bits`` = 8 B N / seconds.
2. **lone** (``--lone-calls``): blocking exchanges one after another, nothing queued behind any of
   them: what a sync call's all-to-all gets. ``lone_throughput_bits`` per direction.
3. **lone gather** (``--gather-bytes G``, optional): blocking ``all_gather`` of G bytes per rank
   (sync SP's K/V exchange), ``gather_throughput_bits`` per direction.
4. **overlap** (``--overlap-calls``): each call posts one exchange, runs a fixed matmul loop
   (``--work-ms``, sized on this machine before the clock starts; long enough that the exchange
   ends inside it) and waits; every call is preceded by the same loop with the link idle. The
   matmul seconds with the exchange in flight against those without give the
   CPU the transfer takes from compute: ``cpu_per_byte`` = extra compute seconds / bytes moved
   (sent + received). Zero where the network path costs the compute thread nothing measurable.

These calibrate the emulated link of ``dice-ds plan --validate`` (``dice_ds.plan.validate``,
docs/plan.md "Link"); only (1) enters the bench's own bound. Rank 0 writes one JSON object to F.
"""

from __future__ import annotations

import argparse
import json
import time


def _clock(fn) -> float:
    """Seconds of ``fn()`` on the slowest rank (both start after a barrier)."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    mine = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine)


def _matmul_loop(work_s: float):
    """A compute loop of about ``work_s`` seconds on this rank's threads; returns run() -> seconds."""
    import torch

    a, b = torch.randn(256, 384), torch.randn(384, 1536)
    for _ in range(3):
        torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mm(a, b)
    reps = max(1, round(work_s / ((time.perf_counter() - t0) / 10)))

    def run() -> float:
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        return time.perf_counter() - t

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="all-to-all link probe (2 ranks)")
    p.add_argument("--bytes-per-call", type=int, required=True)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--lone-calls", type=int, default=0)
    p.add_argument("--gather-bytes", type=int, default=0)
    p.add_argument("--overlap-calls", type=int, default=0)
    p.add_argument("--overlap-window", type=int, default=1,
                   help="exchanges posted together per overlap call (a stale call posts 2)")
    p.add_argument("--work-ms", type=float, default=0.0,
                   help="overlap compute per call (default: 3 x the lone exchange, >= 20 ms)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    n = max(1, args.bytes_per_call // 4)
    nbytes = n * 4
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

    seconds = _clock(pipelined)
    out = {"seconds": seconds, "bytes_per_call": nbytes, "calls": args.calls,
           "throughput_bits": 8 * nbytes * args.calls / seconds}
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
                   gather_throughput_bits=8 * g * 4 * args.lone_calls / s)
    if args.overlap_calls:
        lone_s = out.get("lone_seconds", 2 * seconds) / max(1, out.get("lone_calls", args.calls))
        work_s = args.work_ms / 1e3 if args.work_ms else max(0.02, 3 * lone_s)
        loop = _matmul_loop(work_s)
        alone = with_comm = 0.0

        def interleaved():   # alternate, so that drift of the machine hits both alike
            nonlocal alone, with_comm
            for _ in range(args.overlap_calls):
                alone += loop()
                hs = [dist.all_to_all_single(recv, send, async_op=True)
                      for _ in range(args.overlap_window)]
                with_comm += loop()
                for h in hs:
                    h.wait()

        t_both = _clock(interleaved)
        both = torch.tensor([alone, with_comm], dtype=torch.float64)
        dist.all_reduce(both)          # summed over ranks: the per-rank mean below
        alone, with_comm = (float(x) / world for x in both)
        moved = 2.0 * nbytes * args.overlap_calls * args.overlap_window   # sent + received
        out["overlap"] = {"calls": args.overlap_calls, "window": args.overlap_window,
                          "work_ms": 1e3 * work_s,
                          "compute_alone": alone, "compute_with_exchange": with_comm,
                          "seconds": t_both,
                          "bytes_moved": moved,
                          "cpu_per_byte": max(0.0, with_comm - alone) / moved}
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump(out, fh)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
