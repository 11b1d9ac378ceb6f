"""Benchmark: routed experts (sequential vs grouped) and the full model vs the plain-PyTorch oracle.

Owns nothing but these measurements, single process, CPU, fp32, ``--threads`` intra-op threads, in
ONE invocation so that the numbers are comparable with each other (not with other runs):

1. **experts module alone** (``ModelConfig.experts_impl``: megatron's ``SequentialMLP`` vs
   ``dice_ds/models/experts.py``'s grouped experts) at the debug, S/2 and XL/2 widths with E
   experts: ``--tokens`` tokens routed top-2 by a random softmax router, i.e. 2·tokens rows sorted
   by expert with uneven counts, the call megatron's ``MoELayer`` makes.
2. **full model forward** of dice_ds's DiT-MoE with either experts implementation vs the oracle
   (tests/oracle_dit_moe.py), same weights loaded through ``dice_ds.weights``, at debug and
   DiT-S/2, and at DiT-XL/2 width with a reduced depth (``--xl-depth``; the full 28 layers do not fit
   a CPU time budget; the table says which depth ran).

Each case: warm-up, then ``--repeats`` rounds; every round runs each variant once, the order
rotating from round to round (A/B interleaved). Reported: medians, the ratio of medians, and the
median of the per-round ratios ("paired"), which is less sensitive to load that outlasts a round.
Outputs are compared before timing (max |diff|). Prints markdown tables; ``--out FILE`` writes JSON.

    python scripts/bench_experts.py                      # everything, default settings
    python scripts/bench_experts.py --quick --out /tmp/b.json   # seconds: the smoke test's run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

WIDTHS = {"debug": "debug", "S/2": "DiT-S/2", "XL/2": "DiT-XL/2"}
"""Experts-alone cases: label -> flavor whose hidden size (and FFN ratio) is used."""
MODEL_BATCH = {"debug": 8, "DiT-S/2": 2, "DiT-XL/2": 1}
IMPLS = ("sequential", "grouped")


def _load_oracle_module():
    """tests/oracle_dit_moe.py, imported by path (it is test code, not part of the package)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "oracle_dit_moe.py"
    spec = importlib.util.spec_from_file_location("oracle_dit_moe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each ``fns`` entry: ``repeats`` rounds, order rotating per round."""
    from dice_ds.bench.interleave import interleaved as rotate

    return rotate(fns, warmup, repeats, _time_once)


def _summary(times: dict[str, list[float]], base: str, other: str) -> dict:
    a, b = times[other], times[base]
    return {"ratio": statistics.median(a) / statistics.median(b),
            "paired": statistics.median(x / y for x, y in zip(a, b))}


# ----------------------------------------------------------------------------- experts alone
def _experts_pair(flavor: str, num_experts: int, seed: int):
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights

    cfg = get_flavor(flavor).replace(depth=1, num_experts=num_experts)
    return {impl: init_weights(build_model(cfg.replace(experts_impl=impl)), "random",
                               seed=seed).blocks[0].moe.experts for impl in IMPLS}, cfg


def _routed_rows(cfg, tokens: int, seed: int):
    """2·tokens rows sorted by expert, counts [E] and fp32 probs, from a random top-2 softmax router."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, cfg.num_experts, generator=gen)
    probs, ids = torch.softmax(logits, -1).topk(cfg.top_k, dim=-1)
    ids, probs = ids.reshape(-1), probs.reshape(-1)
    order = torch.argsort(ids, stable=True)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).repeat_interleave(cfg.top_k, 0)
    counts = torch.bincount(ids, minlength=cfg.num_experts)
    return x[order].contiguous(), counts, probs[order].contiguous()


@torch.inference_mode()
def bench_experts(label: str, tokens: int, num_experts: int, warmup: int, repeats: int,
                  seed: int) -> dict:
    experts, cfg = _experts_pair(WIDTHS[label], num_experts, seed)
    x, counts, probs = _routed_rows(cfg, tokens, seed + 1)
    fns = {impl: (lambda m=m: m(x, counts, probs)) for impl, m in experts.items()}
    outs = {impl: fn()[0] for impl, fn in fns.items()}
    times = interleaved(fns, warmup, repeats)
    row = {"width": label, "hidden": cfg.hidden_size, "ffn": cfg.expert_ffn_size,
           "experts": num_experts, "tokens": tokens, "rows": int(counts.sum()),
           "min_rows": int(counts.min()), "max_rows": int(counts.max()),
           "max_diff": (outs["grouped"] - outs["sequential"]).abs().max().item()}
    row.update({f"{impl}_ms": 1e3 * statistics.median(times[impl]) for impl in IMPLS})
    row.update({"grouped/sequential": _summary(times, "sequential", "grouped")})
    del experts
    return row


# ----------------------------------------------------------------------------- full model
def _model_trio(oracle_mod, name: str, depth: int | None, seed: int):
    from dataclasses import replace

    from dice_ds.config import get_flavor
    from dice_ds.models import build_model
    from dice_ds.weights.check import config_for_checkpoint
    from dice_ds.weights.load import load_into_model

    ocfg = oracle_mod.ORACLE_SIZES[name]
    flavor = get_flavor(name)
    if depth is not None:
        ocfg, flavor = replace(ocfg, depth=depth), flavor.replace(depth=depth)
    oracle = oracle_mod.randomize_(oracle_mod.OracleDiTMoE(ocfg), seed).eval()
    sd = oracle.state_dict()
    models = {"oracle": oracle}
    for impl in IMPLS:
        ours = build_model(config_for_checkpoint(flavor.replace(experts_impl=impl), sd))
        load_into_model(ours, sd)
        models[impl] = ours
    return ocfg, models


@torch.inference_mode()
def bench_model(oracle_mod, name: str, depth: int | None, batch: int, warmup: int, repeats: int,
                seed: int) -> dict:
    ocfg, models = _model_trio(oracle_mod, name, depth, seed)
    inputs = oracle_mod.oracle_inputs(ocfg, batch, seed=seed + 1)
    fns = {k: (lambda m=m: m(*inputs)) for k, m in models.items()}
    outs = {k: fn() for k, fn in fns.items()}
    times = interleaved(fns, warmup, repeats)
    row = {"size": name, "depth": ocfg.depth, "full_depth": depth is None, "batch": batch,
           "tokens": batch * (ocfg.input_size // ocfg.patch) ** 2}
    row.update({f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()})
    for impl in IMPLS:
        row[f"{impl}/oracle"] = _summary(times, "oracle", impl)
        row[f"{impl}_max_diff"] = (outs[impl] - outs["oracle"]).abs().max().item()
    row["grouped/sequential"] = _summary(times, "sequential", "grouped")
    del models
    return row


# ----------------------------------------------------------------------------- report
def _r(s: dict) -> str:
    return f"{s['ratio']:.3f} ({s['paired']:.3f})"


def format_tables(result: dict) -> str:
    m = result["meta"]
    lines = [f"routed experts alone, CPU fp32, {m['threads']} thread(s), median of {m['repeats']} "
             "rounds (A/B interleaved); ratio of medians (median of paired ratios)", "",
             "| width | hidden | ffn | E | tokens | rows | rows/expert min-max | sequential ms "
             "| grouped ms | grouped/sequential | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["experts"]:
        lines.append(f"| {r['width']} | {r['hidden']} | {r['ffn']} | {r['experts']} | {r['tokens']} "
                     f"| {r['rows']} | {r['min_rows']}-{r['max_rows']} | {r['sequential_ms']:.2f} "
                     f"| {r['grouped_ms']:.2f} | {_r(r['grouped/sequential'])} "
                     f"| {r['max_diff']:.1e} |")
    lines += ["", f"full model forward vs the oracle (tests/oracle_dit_moe.py), same settings", "",
              "| size | depth | batch | tokens | oracle ms | ours sequential ms | ours grouped ms "
              "| sequential/oracle | grouped/oracle | grouped/sequential | max abs diff vs oracle |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["model"]:
        depth = f"{r['depth']}" + ("" if r["full_depth"] else " (reduced)")
        lines.append(f"| {r['size']} | {depth} | {r['batch']} | {r['tokens']} | {r['oracle_ms']:.2f} "
                     f"| {r['sequential_ms']:.2f} | {r['grouped_ms']:.2f} "
                     f"| {_r(r['sequential/oracle'])} | {_r(r['grouped/oracle'])} "
                     f"| {_r(r['grouped/sequential'])} "
                     f"| {max(r['sequential_max_diff'], r['grouped_max_diff']):.1e} |")
    if any(not r["full_depth"] for r in result["model"]):
        lines += ["", "(reduced): the flavor's width with fewer layers than the real model "
                  "(--xl-depth); per-layer cost is the same, totals are not the real model's."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="debug,S/2,XL/2", help="experts-alone widths: "
                   + ", ".join(WIDTHS))
    p.add_argument("--tokens", type=int, default=512, help="tokens per experts call (rows = 2x)")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--sizes", default="debug,DiT-S/2,DiT-XL/2",
                   help="full-model sizes (DiT-XL/2 runs at --xl-depth)")
    p.add_argument("--xl-depth", type=int, default=2, help="layers of the DiT-XL/2-width model")
    p.add_argument("--batch", type=int, default=None, help="model batch for every size (default: "
                   + ", ".join(f"{k} {v}" for k, v in MODEL_BATCH.items()) + ")")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: debug width and debug model only, 64 tokens, 1 warm-up, 2 rounds")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.sizes, args.tokens, args.warmup, args.repeats = "debug", "debug", 64, 1, 2
    if args.repeats < 1 or args.threads < 1 or args.tokens < 1:
        p.error("--repeats, --threads and --tokens must be >= 1")
    from dice_ds import mcore
    from dice_ds.parallel.groups import init_distributed

    mcore.prepare("cpu")  # an entry point: megatron's CPU patches, a 1-rank world
    init_distributed("cpu")
    widths = [w for w in args.widths.split(",") if w]
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [w for w in widths if w not in WIDTHS] + [s for s in sizes if s not in MODEL_BATCH]
    if bad:
        p.error(f"unknown width/size {bad}: widths {list(WIDTHS)}, sizes {list(MODEL_BATCH)}")
    torch.set_num_threads(args.threads)
    oracle_mod = _load_oracle_module()
    result = {"meta": {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                       "torch": torch.__version__, "machine": platform.machine(),
                       "argv": sys.argv[1:] if argv is None else list(argv)},
              "experts": [], "model": []}
    for w in widths:
        result["experts"].append(bench_experts(w, args.tokens, args.num_experts, args.warmup,
                                               args.repeats, args.seed))
        print(f"done experts {w}", flush=True)
    for s in sizes:
        depth = args.xl_depth if s == "DiT-XL/2" else None
        batch = args.batch or MODEL_BATCH[s]
        result["model"].append(bench_model(oracle_mod, s, depth, batch, args.warmup, args.repeats,
                                           args.seed))
        print(f"done model {s}", flush=True)
    print("\n" + format_tables(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
