"""Communication-only measurements for ``dice-ds bench``: the link, without the model's compute.

``python -m dice_ds.bench.probe --bytes-per-call B --calls N --out F`` (2 ranks, launcher
environment). Three measurements, all with exchanges that send B bytes to the other rank (and B to
itself, as an EP all-to-all does), both directions at once:

1. **pipelined** (T_comm of the bench): N ``all_to_all_single`` posted back to back with up to
   ``--window`` in flight. The seconds from the first post to the last completion (after a barrier
   and one warm-up exchange), max over ranks. ``throughput_bits`` = 8 B N / seconds.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="all-to-all link probe (2 ranks)")
    p.add_argument("--bytes-per-call", type=int, required=True)
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
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump(out, fh)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
