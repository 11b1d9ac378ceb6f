"""Lone-exchange patterns on the emulated links: which traffic shape gets which rate.

``python -m dice_ds.bench.patterns --ranks 4 --links 100mbit --bytes 65536,195172`` (root, as
``dice-ds bench``: network namespaces of ``dice_ds.bench.links``) runs, for every link and size B
(bytes each rank sends per call), blocking calls one after another (nothing queued behind any):

- ``a2a``: one all-to-all over all ranks, B / (W - 1) to each peer (a sync EP call);
- ``pair``: an all-to-all inside pairs of ranks (0-1, 2-3, ...: an EP or SP group of 2);
- ``oneway``: even ranks send B to their pair, odd ranks only receive;
- ``gather``: one all-gather of B per rank over all ranks (sync SP's K/V), rate counted on the
  (W - 1) x B each rank receives.

Prints and writes (``--out``) Mbit/s per rank and direction. ``--spinners K`` runs K busy loops
at nice 19 beside the ranks (cores never idle, the ranks still get them). The numbers behind
docs/plan.md "Link" (why a lone exchange is slow, and why a gather beyond 2 ranks is not).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dice_ds.bench import launch
from dice_ds.bench.links import Links, available

CALLS = 30


def _rank_side(sizes: list[int], out: Path) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(w // 2)]
    mine = pairs[r // 2] if r // 2 < len(pairs) else None

    def clock(fn) -> float:
        fn()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(CALLS):
            fn()
        dist.barrier()
        return (time.perf_counter() - t) / CALLS

    res = {}
    for b in sizes:
        n = b // 4
        send = torch.zeros(n // (w - 1) * w)
        recv = torch.empty_like(send)
        res[f"a2a {b}"] = 8 * b / clock(lambda: dist.all_to_all_single(recv, send)) / 1e6
        if mine is not None and w % 2 == 0:
            ps, pr = torch.zeros(2 * n), torch.empty(2 * n)
            res[f"pair {b}"] = 8 * b / clock(
                lambda: dist.all_to_all_single(pr, ps, group=mine)) / 1e6
            buf = torch.zeros(n)
            res[f"oneway {b}"] = 8 * b / clock(
                lambda: dist.send(buf, r + 1) if r % 2 == 0 else dist.recv(buf, r - 1)) / 1e6
        part, every = torch.zeros(n), torch.empty(n * w)
        res[f"gather {b}"] = 8 * b * (w - 1) / clock(
            lambda: dist.all_gather_into_tensor(every, part)) / 1e6
    if r == 0:
        out.write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dice_ds.bench.patterns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--links", default="100mbit")
    p.add_argument("--bytes", default="195172", help="comma-separated bytes per rank per call")
    p.add_argument("--spinners", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    p.add_argument("--rank-side", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.bytes.split(",")]
    if a.rank_side:
        _rank_side(sizes, Path(a.rank_side))
        return 0

    why = available()
    if why:
        print(f"patterns: {why}", file=sys.stderr)
        return 2
    spin = [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
            for _ in range(a.spinners)]
    results = {}
    try:
        tmp = tempfile.mkdtemp(prefix="dice_ds_patterns_")
        with Links(True, ranks=a.ranks) as net:
            for i, link in enumerate(a.links.split(",")):
                net.shape(link)
                out = Path(tmp) / link / "patterns.json"
                ok, why = launch.run_ranks(
                    net, link, 29600 + i, ["dice_ds.bench.patterns", "--bytes", a.bytes,
                                           "--rank-side", str(out)], out.parent, 600)
                if not ok:
                    print(f"patterns: {link} failed ({why}); rank logs in {out.parent}",
                          file=sys.stderr)
                    return 1
                results[link] = json.loads(out.read_text())
                for k, v in results[link].items():
                    print(f"{a.ranks} ranks {link:8} {k:16} {v:7.1f} Mbit/s", flush=True)
    finally:
        for s in spin:
            s.kill()
    if a.out:
        Path(a.out).write_text(json.dumps({"ranks": a.ranks, "spinners": a.spinners,
                                           "calls": CALLS, "mbit_s": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
