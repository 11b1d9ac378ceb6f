"""Benchmark: single-process forward of dice_ds's DiT-MoE vs the plain-PyTorch oracle, same weights.

Owns nothing but this measurement. For each size it builds the oracle (tests/oracle_dit_moe.py) with
random weights, loads its released-format state dict into dice_ds's model through
``dice_ds.checkpoint``, checks the outputs agree, then times both forwards in one process: warm-up,
then ``--repeats`` rounds whose A/B order alternates, and reports the medians and their ratio
(ours / oracle; < 1 means dice_ds is faster), plus the median of the per-round ratios ("paired"),
which is less sensitive to load from other processes that lasts longer than one round. CPU, fp32, ``--threads`` intra-op threads.

    python scripts/bench_model_vs_oracle.py                 # debug (batch 8) and DiT-S/2 (batch 2)
    python scripts/bench_model_vs_oracle.py --sizes debug --repeats 15
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_BATCH = {"debug": 8, "DiT-S/2": 2, "DiT-B/2": 1}


def _load_oracle_module():
    """tests/oracle_dit_moe.py, imported by path (it is test code, not part of the package)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "oracle_dit_moe.py"
    spec = importlib.util.spec_from_file_location("oracle_dit_moe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _build_pair(oracle_mod, name: str, seed: int):
    from dice_ds.checkpoint import config_for_checkpoint, load_into_model
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model

    ocfg = oracle_mod.ORACLE_SIZES[name]
    oracle = oracle_mod.randomize_(oracle_mod.OracleDiTMoE(ocfg), seed).eval()
    sd = oracle.state_dict()
    ours = build_model(config_for_checkpoint(get_flavor(name), sd))
    load_into_model(ours, sd)
    return ocfg, oracle, ours


def _time_once(model, inputs) -> float:
    start = time.perf_counter()
    model(*inputs)
    return time.perf_counter() - start


@torch.inference_mode()
def bench_size(oracle_mod, name: str, batch: int, warmup: int, repeats: int, seed: int) -> dict:
    ocfg, oracle, ours = _build_pair(oracle_mod, name, seed)
    inputs = oracle_mod.oracle_inputs(ocfg, batch, seed=seed + 1)
    max_diff = (ours(*inputs) - oracle(*inputs)).abs().max().item()
    for _ in range(warmup):
        _time_once(ours, inputs), _time_once(oracle, inputs)
    t_ours, t_oracle = [], []
    for rep in range(repeats):
        if rep % 2 == 0:
            t_ours.append(_time_once(ours, inputs))
            t_oracle.append(_time_once(oracle, inputs))
        else:
            t_oracle.append(_time_once(oracle, inputs))
            t_ours.append(_time_once(ours, inputs))
    med_ours, med_oracle = statistics.median(t_ours), statistics.median(t_oracle)
    return {"size": name, "batch": batch, "tokens": batch * (ocfg.input_size // ocfg.patch) ** 2,
            "ours_ms": 1e3 * med_ours, "oracle_ms": 1e3 * med_oracle,
            "ratio": med_ours / med_oracle, "max_diff": max_diff,
            "paired": statistics.median(a / b for a, b in zip(t_ours, t_oracle))}


def _print_table(rows: list[dict], threads: int, repeats: int) -> None:
    print(f"\nforward latency, CPU fp32, {threads} thread(s), median of {repeats} (A/B alternating)")
    head = f"{'size':<9}{'batch':>6}{'tokens':>8}{'ours ms':>11}{'oracle ms':>11}" \
           f"{'ours/oracle':>13}{'paired':>8}{'max|diff|':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:<9}{r['batch']:>6}{r['tokens']:>8}{r['ours_ms']:>11.2f}"
              f"{r['oracle_ms']:>11.2f}{r['ratio']:>13.3f}{r['paired']:>8.3f}{r['max_diff']:>11.2e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="debug,DiT-S/2", help="comma-separated model sizes")
    p.add_argument("--batch", type=int, default=None, help="batch for every size (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()) + ")")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    oracle_mod = _load_oracle_module()
    rows = []
    for name in args.sizes.split(","):
        batch = args.batch or DEFAULT_BATCH.get(name, 1)
        rows.append(bench_size(oracle_mod, name, batch, args.warmup, args.repeats, args.seed))
        print(f"done {name}", flush=True)
    _print_table(rows, args.threads, args.repeats)


if __name__ == "__main__":
    main()
