"""Memory and start-up of real-size runs: one ``torchrun`` per row, numbers from its run.json.

Every row samples 1 image per rank with 2 DDIM steps (``--vae none``) from a checkpoint, on W
gloo ranks, and reports per rank: this rank's parameter bytes in the run dtype, its peak resident
memory (``ru_maxrss``), the peak anonymous and file-backed parts during start-up
(``/proc/self/status``), the weight-load seconds and bytes, and the plain ``pread`` of the same
bytes (``DICE_DS_READ_BASELINE=1``: ``dice_ds.weights.load.time_plain_read``). The first row
should be the overhead row (``--model debug`` without a checkpoint): (peak - overhead) / weights
is computed against it. Used for ``docs/scale.md``:

    python scripts/scale_table.py --out docs/scale_runs.json \\
        --row "overhead|2|--model debug --init random" \\
        --row "B/2 DP fp32|2|--model DiT-B/2 --ckpt /work/big/b2.pt" ...

A row is ``name|ranks|sample flags``; common flags are appended unless the row gives them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

COMMON = ["--vae", "none", "--sampler", "ddim", "--num-sampling-steps", "2",
          "--per-proc-batch-size", "1", "--device", "cpu"]


def _read_file(path: str) -> None:
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


def _run_row(name: str, ranks: int, flags: list[str], workdir: str, timeout: float,
             warm: bool = False) -> dict:
    sample_dir = os.path.join(workdir, name.replace("/", "-").replace(" ", "_"))
    extra = [] if "--image-size" in flags else ["--image-size", "128"]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(29500 + os.getpid() % 1000), "-m", "dice_ds.sample", *flags,
            *COMMON, *extra, "--num-fid-samples", str(ranks), "--sample-dir", sample_dir,
            "--force-new"]
    env = dict(os.environ, DICE_DS_READ_BASELINE="1")
    if warm and "--ckpt" in flags:  # the file into the page cache first, so that neither the
        _read_file(flags[flags.index("--ckpt") + 1])  # plain read nor the load hits the disk
    t0 = time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"row {name!r} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(sample_dir, "run.json")) as fh:
        info = json.load(fh)
    return {"name": name, "ranks": ranks, "flags": flags, "wall_seconds": wall,
            "sampling_seconds": info["sampling_seconds"],
            "per_rank": [_rank_facts(r) for r in info["per_rank"]]}


def _rank_facts(r: dict) -> dict:
    st = r["startup"]
    peaks = st["peak_bytes_startup"]
    return {"rank": r["rank"], "param_bytes": st.get("param_bytes"),
            "peak_rss": r["peak_memory_bytes"], "peak_anon": peaks.get("anon"),
            "peak_file": peaks.get("file"), "load_anon": st["peak_bytes"]["weight_load"]["anon"],
            "seconds": st["seconds"], "before_main": st.get("before_main"),
            "bytes_read": st.get("bytes_read"), "plain_read": st.get("plain_read")}


def plan_peak_bytes(flags: list[str], ranks: int, overhead: float) -> dict:
    """``dice-ds plan``'s memory column for a row (dice_ds/plan/memory.py) plus the measured
    per-process overhead (the first row's peak): the predicted peak resident bytes per rank."""
    from dice_ds.config import get_flavor
    from dice_ds.options import build_plan, image_size_of, parse_options, steps_of
    from dice_ds.plan.memory import memory
    from dice_ds.schedule import Schedule
    from dice_ds.workload import Workload

    opts = parse_options([*flags, *COMMON, *([] if "--image-size" in flags
                                              else ["--image-size", "128"])])
    cfg = get_flavor(opts.model)
    cfg = cfg.replace(depth=opts.depth or cfg.depth, num_experts=opts.num_experts or cfg.num_experts)
    plan = build_plan(opts, world_size=ranks, num_experts=cfg.num_experts, depth=cfg.depth)
    tokens = (image_size_of(opts) // 8 // cfg.patch_size) ** 2
    w = Workload(cfg, images_per_rank=opts.per_proc_batch_size, cfg_guidance=opts.cfg_scale > 1,
                 steps=steps_of(opts), dtype=opts.dtype, tokens=tokens)
    mem = memory(w, Schedule.build(plan, w.steps, cfg.depth), plan.ep_size, plan.sp_size,
                 plan.payload_dtype)
    return {**mem, "overhead": overhead, "total": overhead + sum(mem.values())}


def _ratios(rows: list[dict]) -> None:
    """Ratios against the overhead row of the same rank count (rows named "overhead..."; the
    first row where none matches)."""
    over = {row["ranks"]: row for row in rows if row["name"].startswith("overhead")}
    for row in rows:
        base = over.get(row["ranks"], rows[0])["per_rank"]
        over_rss = max(r["peak_rss"] for r in base)
        over_anon = max(r["peak_anon"] for r in base)
        row["overhead_row"] = over.get(row["ranks"], rows[0])["name"]
        row["plan"] = plan_peak_bytes(row["flags"], row["ranks"], over_rss)
        for r in row["per_rank"]:
            r["plan_error"] = row["plan"]["total"] / r["peak_rss"] - 1
            w = r["param_bytes"]
            r["rss_ratio"] = (r["peak_rss"] - over_rss) / w
            r["anon_ratio"] = (r["peak_anon"] - over_anon) / w
            pr = r.get("plain_read")
            load = r["seconds"].get("weight_load")
            r["load_vs_read"] = load / pr["seconds"] if pr and pr["seconds"] else None


def _table(rows: list[dict]) -> str:
    gb = 1e9
    out = ["| run | ranks | weights/rank (GB) | peak/rank (GB) | anon peak (GB) | "
           "(peak - overhead)/weights | (anon - overhead)/weights | load s | plain read s | "
           "load/read | build s | imports s | plan peak (GB) | plan error |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        worst = max(row["per_rank"], key=lambda r: r["rss_ratio"])
        pr = worst.get("plain_read") or {}
        lvr = worst.get("load_vs_read")
        out.append(
            f"| {row['name']} | {row['ranks']} | {worst['param_bytes'] / gb:.2f} | "
            f"{worst['peak_rss'] / gb:.2f} | {worst['peak_anon'] / gb:.2f} | "
            f"{worst['rss_ratio']:.2f}x | {worst['anon_ratio']:.2f}x | "
            f"{worst['seconds'].get('weight_load', 0):.2f} | "
            f"{pr.get('seconds', float('nan')):.2f} | "
            f"{'' if lvr is None else f'{lvr:.2f}x'} | {worst['seconds'].get('model_build', 0):.2f} | "
            f"{worst['seconds'].get('imports', 0):.1f} | {row['plan']['total'] / gb:.2f} | "
            f"{100 * worst['plan_error']:+.0f} % |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", required=True, help="name|ranks|sample flags")
    ap.add_argument("--out", required=True, help="JSON with every row (a .md table beside it)")
    ap.add_argument("--workdir", default=None, help="sample directories (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--warm", action="store_true",
                    help="read each row's checkpoint once before the row (page-cache timings)")
    args = ap.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dice_scale_")
    rows = []
    for spec in args.row:
        name, ranks, flags = spec.split("|", 2)
        print(f"scale_table: {name} ...", file=sys.stderr, flush=True)
        rows.append(_run_row(name, int(ranks), shlex.split(flags), workdir, args.timeout,
                             args.warm))
    _ratios(rows)
    load = os.getloadavg()
    doc = {"rows": rows, "loadavg_after": load, "command": " ".join(sys.argv)}
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    table = _table(rows)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
