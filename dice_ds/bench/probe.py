"""Communication-only measurement for ``dice-ds bench``: the exchanges of a run without its compute.

``python -m dice_ds.bench.probe --bytes-per-call B --calls N --out F`` (2 ranks, launcher
environment): every rank posts N ``all_to_all_single`` exchanges that each send B bytes to the
other rank (and B to itself, as an EP all-to-all does), back to back with up to ``--window`` in
flight, both directions at once. The seconds from the first post to the last completion (after a
barrier and one warm-up exchange), max over ranks, is T_comm: the time the link needs for these
bytes in this many messages when nothing else waits. Rank 0 writes ``{"seconds", "bytes_per_call",
"calls", "throughput_bits"}`` to F.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="all-to-all link probe (2 ranks)")
    p.add_argument("--bytes-per-call", type=int, required=True)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    n = max(1, args.bytes_per_call // 4)
    send = torch.zeros(n * world, dtype=torch.float32)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    dist.barrier()
    t0 = time.perf_counter()
    inflight = []
    for _ in range(args.calls):
        inflight.append(dist.all_to_all_single(recv, send, async_op=True))
        if len(inflight) >= args.window:
            inflight.pop(0).wait()
    for h in inflight:
        h.wait()
    mine = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    seconds = float(mine)
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump({"seconds": seconds, "bytes_per_call": n * 4, "calls": args.calls,
                       "throughput_bits": 8 * n * 4 * args.calls / seconds}, fh)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
