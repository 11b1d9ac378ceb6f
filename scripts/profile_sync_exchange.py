"""Where a sync EP call's time goes, per rank and per call, on an emulated link (issue 22 item 0).

``python scripts/profile_sync_exchange.py --ranks 4 --link 100mbit --out /tmp/prof [-- SAMPLE FLAGS]``
(root: network namespaces, ``dice_ds/bench/links.py``). Each rank samples the bench's DiT-S/2 job
(sync EP unless flags after ``--`` say otherwise) with the runtime's phase trace on
(``PhaseTimer.trace``, ``dice_ds/moe/profile.py``), then replays the same calls' splits as plain
``all_to_all_single`` exchanges with nothing else running (dispatch payload: D + 1 columns, combine:
D). Rank 0 writes ``trace.json`` (every rank's phases with their start and end on the machine-wide
monotonic clock) and prints, per phase kind:

- ``own``: the phase's seconds as the rank's timer sees them (sum over calls, median over ranks);
- ``peers``: of those, the seconds spent before the LAST rank entered the same call's phase
  (waiting for a slower peer: its compute, not the link);
- ``transfer``: the rest (from the last rank's entry to this rank's exit);
- ``replay``: the same splits as plain blocking ``all_to_all_single`` calls, back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

JOB = ("--model", "DiT-S/2", "--image-size", "128", "--vae", "none", "--sampler", "rf",
       "--num-sampling-steps", "10", "--per-proc-batch-size", "1", "--cfg-scale", "1.5",
       "--init", "random", "--global-seed", "0", "--device", "cpu")


def worker(out: Path, flags: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from dice_ds import DiTMoEPipeline
    from dice_ds.options import parse_options

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    opts = parse_options([*JOB, "--ep", "--num-fid-samples", str(world), *flags])
    pipe = DiTMoEPipeline(opts, output_ranks="rank0")
    rt = pipe.runtime
    labels = [(7 * i) % 1000 for i in range(world)]
    pipe(class_labels=labels, seed=1, output_type="latent")  # warm-up call
    rt.timer.trace = []
    dist.barrier()
    t0 = time.perf_counter()
    pipe(class_labels=labels, seed=1, output_type="latent")
    wall = time.perf_counter() - t0
    trace, rt.timer.trace = rt.timer.trace, None
    hidden = pipe.model.pos_embed.shape[-1]
    replay = {"dispatch": 0.0, "combine": 0.0}
    ep = rt.groups.ep_group if hasattr(rt.groups, "ep_group") else None
    group = ep or pipe.runtime.layers[0].token_dispatcher.ep_group
    calls = [(send, recv) for name, send, recv, _ in trace if name == "splits"]
    dist.barrier()
    for kind, cols in (("dispatch", hidden + 1), ("combine", hidden)):
        for send, recv in calls:
            s, r = (send, recv) if kind == "dispatch" else (recv, send)
            x = torch.randn(sum(s), cols)
            y = x.new_empty(sum(r), cols)
            dist.barrier()
            t = time.perf_counter()
            dist.all_to_all_single(y, x, r, s, group=group)
            replay[kind] += time.perf_counter() - t
    mine = {"rank": rank, "wall": wall, "replay": replay,
            "trace": [(n, a, b, tag) for n, a, b, tag in trace if n != "splits"],
            "splits": calls}
    got = [None] * world
    dist.all_gather_object(got, mine)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "trace.json").write_text(json.dumps(got))
        print(summary(got))
    dist.barrier()


def summary(ranks: list[dict]) -> str:
    """The table of the module docstring, from every rank's record."""
    starts: dict = defaultdict(list)  # (phase, tag) -> every rank's start
    for r in ranks:
        for name, a, _b, tag in r["trace"]:
            starts[(name, tuple(tag))].append(a)
    kinds = sorted({n for r in ranks for n, *_ in r["trace"]})
    lines = [f"{len(ranks)} ranks; call wall s per rank: "
             + ", ".join(f"{r['wall']:.2f}" for r in ranks),
             "| phase | own s | peers s | transfer s | replay s |", "|---|---:|---:|---:|---:|"]
    for kind in kinds:
        own, peers = [], []
        for r in ranks:
            o = p = 0.0
            for name, a, b, tag in r["trace"]:
                if name != kind:
                    continue
                last = max(starts[(name, tuple(tag))])
                o += b - a
                p += min(max(last - a, 0.0), b - a)
            own.append(o)
            peers.append(p)
        rep = [r["replay"].get(kind) for r in ranks]
        rep_s = f"{statistics.median(rep):.2f}" if None not in rep else "-"
        lines.append(f"| {kind} | {statistics.median(own):.2f} | {statistics.median(peers):.2f} | "
                     f"{statistics.median(own) - statistics.median(peers):.2f} | {rep_s} |")
    return "\n".join(lines)


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--link", default="100mbit")
    p.add_argument("--out", type=Path, default=Path("/tmp/profile_sync"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.out, extra)
        return 0
    from dice_ds.bench.links import Links

    with Links(use_netns=True, ranks=a.ranks) as links:
        links.shape(a.link)
        procs = []
        for rank in range(a.ranks):
            prefix, env = links.rank_env(a.link, rank, 29631)
            procs.append(subprocess.Popen([*prefix, sys.executable, __file__, "--worker",
                                           "--out", str(a.out), "--", *extra], env=env))
        codes = [pr.wait() for pr in procs]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
