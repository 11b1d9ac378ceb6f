"""Per-rank parameter memory of a DiT-MoE under expert parallelism (EP 1/2/4 by default).

For each EP size e, starts e gloo ranks on this machine (EP group = the whole world), builds each
requested flavor on its real groups with ``dice_ds.models.build_model`` and counts, on every rank,
the parameters it actually holds: routed-expert parameters (E/e experts per MoE layer) and the
replicated rest. Flavors named in ``--meta`` are built on the meta device (shapes only, no memory),
which is how DiT-XL/2 (4.17 B parameters) fits on a small CPU machine; the others are allocated for
real on the CPU. Bytes are numel x element size of ``--dtype``.

Usage:
  python scripts/bench_expert_memory.py                       # debug, DiT-S/2, DiT-XL/2 (meta), EP 1/2/4
  python scripts/bench_expert_memory.py --models DiT-G/2 --meta DiT-G/2 --ep 1,2,4 --dtype fp16

Prints one row per (model, EP size) with the per-rank numbers (identical on every rank; the script
checks that) and the ratio to EP 1; ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile



def _count(model) -> dict:
    from dice_ds.models.experts import is_routed_expert_param

    expert = dense = expert_bytes = dense_bytes = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if is_routed_expert_param(name):  # either ModelConfig.experts_impl
            expert, expert_bytes = expert + p.numel(), expert_bytes + nbytes
        else:
            dense, dense_bytes = dense + p.numel(), dense_bytes + nbytes
    local = sorted({int(i) for m in model.moe_layers() for i in m.local_expert_indices})
    return {"expert_params": expert, "dense_params": dense, "expert_bytes": expert_bytes,
            "dense_bytes": dense_bytes, "local_experts": local}


def _rank_main(rank: int, world: int, store: str, jobs: list, dtype: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from dice_ds.config import get_flavor
    from dice_ds.models import DTYPES, build_model
    from dice_ds import mcore
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups, init_distributed

    try:
        init_distributed("cpu", init_method=f"file://{store}", rank=rank, world_size=world)
        mcore.prepare("cpu")
        groups = build_groups(ParallelDims(world, world))
        for name, meta in jobs:
            device = "meta" if meta else "cpu"
            ctx = torch.device("meta") if meta else contextlib.nullcontext()
            with ctx:
                model = build_model(get_flavor(name), groups, DTYPES[dtype], device)
            results.put((rank, name, _count(model), device))
            del model
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", repr(e), None))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def measure(ep_size: int, jobs: list, dtype: str) -> dict:
    """{model: [per-rank counts]} for one EP size (world = ep_size)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, ep_size, store, jobs, dtype, results))
                 for r in range(ep_size)]
        for p in procs:
            p.start()
        out: dict[str, list] = {name: [None] * ep_size for name, _ in jobs}
        for _ in range(ep_size * len(jobs)):
            rank, name, counts, device = results.get(timeout=600)
            if name == "error":
                raise RuntimeError(f"rank {rank} failed: {counts}")
            out[name][rank] = dict(counts, device=device)
        for p in procs:
            p.join()
    return out


def _rows(per_ep: dict, models: list, ep_sizes: list, dtype: str) -> list[dict]:
    rows = []
    for name in models:
        base = None
        for e in ep_sizes:
            ranks = per_ep[e][name]
            sizes = {(r["expert_bytes"], r["dense_bytes"]) for r in ranks}
            assert len(sizes) == 1, f"{name} EP {e}: ranks hold different byte counts {sizes}"
            r0 = ranks[0]
            total = r0["expert_bytes"] + r0["dense_bytes"]
            base = total if e == ep_sizes[0] and e == 1 else base
            rows.append({
                "model": name, "ep": e, "device": r0["device"], "dtype": dtype,
                "params_per_rank": r0["expert_params"] + r0["dense_params"],
                "bytes_per_rank": total, "expert_bytes": r0["expert_bytes"],
                "dense_bytes": r0["dense_bytes"],
                "experts_per_layer": len(r0["local_experts"]),
                "rank_experts": [r["local_experts"] for r in ranks],
                "vs_ep1": (total / base) if base else None,
            })
    return rows


def _print(rows: list[dict]) -> None:
    mib = 1024 ** 2
    print(f"{'model':10} {'EP':>3} {'device':>6} {'dtype':>5} {'params/rank':>14} {'MiB/rank':>10} "
          f"{'experts MiB':>11} {'dense MiB':>9} {'E/layer':>7} {'vs EP1':>7}  rank experts")
    for r in rows:
        ratio = f"{r['vs_ep1']:.3f}" if r["vs_ep1"] else "-"
        print(f"{r['model']:10} {r['ep']:>3} {r['device']:>6} {r['dtype']:>5} {r['params_per_rank']:>14,} "
              f"{r['bytes_per_rank'] / mib:>10.1f} {r['expert_bytes'] / mib:>11.1f} "
              f"{r['dense_bytes'] / mib:>9.1f} {r['experts_per_layer']:>7} {ratio:>7}  "
              f"{r['rank_experts']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="debug,DiT-S/2,DiT-XL/2")
    ap.add_argument("--meta", default="DiT-XL/2,DiT-G/2", help="flavors built on the meta device")
    ap.add_argument("--ep", default="1,2,4", help="EP sizes (each starts that many ranks)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    meta = set(args.meta.split(","))
    ep_sizes = sorted(int(e) for e in args.ep.split(","))
    jobs = [(m, m in meta) for m in models]
    per_ep = {e: measure(e, jobs, args.dtype) for e in ep_sizes}
    rows = _rows(per_ep, models, ep_sizes, args.dtype)
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
