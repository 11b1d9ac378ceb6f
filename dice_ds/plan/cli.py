"""``dice-ds plan``: predicted step time per parallel mode on GPUs / links, and validation.

Owns the subcommand's flags and the loops over models x GPU counts x scenarios
('device:link' pairs, e.g. rtx4090:pcie4); with ``--ranks-per-node K`` over a two-level fabric
(``--intra-link`` inside nodes of K ranks, ``--inter-link`` between them) every mode in both rank
layouts, the faster picked (``dice_ds.plan.fabric``). ``--bench-json B`` with ``--device cpu`` uses this CPU
as measured by a ``dice-ds bench`` run (its DP row's FLOP/s); ``--validate B`` predicts every row
of that bench and compares. Output: plan.md, plan.json, plan.png in ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from dice_ds.bench.probe import machine
from dice_ds.config import ConfigError, get_flavor
from dice_ds.ds_config import DTYPES
from dice_ds.plan import report
from dice_ds.plan.costs import costs_from_flops
from dice_ds.plan.fabric import Fabric, predict_layouts
from dice_ds.plan.machine import notes
from dice_ds.plan.predict import PLAN_MODES, Topology, predict_all
from dice_ds.plan.presets import EFFICIENCY, parse_device, parse_link
from dice_ds.plan.validate import cpu_device, fit_emulation, load, save_loads, validate
from dice_ds.plan.validate_nodes import validate_nodes
from dice_ds.workload import Workload

DEFAULT_SCENARIOS = "rtx4090:pcie4,a100:pcie4,h100:nvlink-h100"
PAPER = {"model": "DiT-XL/2", "gpus": 8, "scenario": "rtx4090:pcie4", "reported": 1.26}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dice-ds plan",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Analytical step time of every parallel mode "
                                            "(docs/plan.md).")
    p.add_argument("--models", default="DiT-XL/2,DiT-G/2")
    p.add_argument("--gpus", default="8,16,64")
    p.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                   help="device:link pairs; devices rtx4090, a100, h100, cpu (needs --bench-json);"
                        " links pcie4, nvlink-h100, ib400, loopback or a rate like 300mbit")
    p.add_argument("--inter-link", default="ib400", help="between nodes (groups > --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--ranks-per-node", type=int, default=None, metavar="K",
                   help="two-level fabric: nodes of K ranks, --intra-link inside a node, "
                        "--inter-link between nodes; every mode with groups of one node's size, "
                        "predicted in both rank layouts (its groups inside nodes or across) and "
                        "the faster one picked (docs/plan.md 'Two-level fabric')")
    p.add_argument("--intra-link", default=None,
                   help="with --ranks-per-node: the link inside a node (default: the scenario's)")
    p.add_argument("--nic-per-rank", action="store_true",
                   help="with --ranks-per-node: --inter-link is one per rank (a NIC per GPU), not "
                        "one per node shared by its ranks (the emulated nodes)")
    p.add_argument("--modes", default=",".join(PLAN_MODES))
    p.add_argument("--batch", type=int, default=32, help="images per GPU (CFG doubles the rows)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-cfg", action="store_true", help="cfg scale 1 (no doubled batch)")
    p.add_argument("--dtype", default="fp16", choices=DTYPES)
    p.add_argument("--efficiency", type=float, default=EFFICIENCY,
                   help="fraction of the device's dense peak a step sustains")
    p.add_argument("--bench-json", default=None, help="calibrates the 'cpu' device")
    p.add_argument("--validate", default=None, metavar="BENCH_JSON",
                   help="also predict every row of this dice-ds bench JSON and compare")
    p.add_argument("--fit-on", default=None, metavar="LINK",
                   help="validation: also fit the one emulation constant (CPU seconds per "
                        "byte moved) on this shaped link's rows and predict every link with it")
    p.add_argument("--emulation-from", default=None, metavar="BENCH_JSON",
                   help="with --fit-on: fit the emulation constant on this bench instead of the "
                        "validated one (a hold-out invocation)")
    p.add_argument("--calibration", default=None, metavar="BENCH_JSON",
                   help="validation at N ranks: predict the --validate bench (any --ranks) from "
                        "this bench of the same job (2 ranks): its DP rows, its probes and, with "
                        "--fit-on, the constant fitted on it; nothing from the N-rank timings")
    p.add_argument("--link-from-bench", action="store_true",
                   help="with --calibration: take the link from the validated bench's own "
                        "communication-only probe (measured at its rank count)")
    p.add_argument("--save-loads", action="store_true",
                   help="validation: write <bench>.loads.json (the sync runs' routing rows) beside "
                        "the bench JSON, so it validates without the run directories")
    p.add_argument("--no-loads", action="store_true",
                   help="validation: ignore the sync run's per-rank routing loads")
    p.add_argument("--out", default="plan_out")
    return p


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _workload(a, cfg) -> Workload:
    return Workload(cfg, images_per_rank=a.batch, cfg_guidance=not a.no_cfg, steps=a.steps,
                    dtype=a.dtype)


def _device(a, name: str):
    """A device preset at ``--efficiency``, or 'cpu' calibrated by ``--bench-json``."""
    if name != "cpu":
        return replace(parse_device(name), efficiency=a.efficiency)
    if not a.bench_json:
        raise ValueError("device 'cpu' needs --bench-json (a dice-ds bench JSON)")
    return cpu_device(load(a.bench_json))


def _cases(a, models):
    """(flavor, workload, scenario, its link name, device, layer costs) per model and scenario."""
    for model in models:
        cfg = get_flavor(model)
        w = _workload(a, cfg)
        for scen in _split(a.scenarios):
            dev_name, link_name = scen.split(":", 1)
            dev = _device(a, dev_name)
            yield cfg, w, scen, link_name, dev, costs_from_flops(w, dev.flops)


def scenarios(a, models, gpus) -> list[dict]:
    rows = []
    topo = Topology(a.gpus_per_node, parse_link(a.inter_link))
    for cfg, w, scen, link_name, dev, costs in _cases(a, models):
        link = parse_link(link_name)
        for n in gpus:
            for r in predict_all(w, costs, link, n, _split(a.modes), topo=topo):
                held = sum(r["memory"].values())
                fits = held <= dev.memory_gib * 2**30 if dev.memory_gib else None
                rows.append({"model": cfg.name, "gpus": n, "scenario": scen, **r,
                             "fits_memory": fits})
    return rows


def layout_rows(a, models, gpus) -> list[dict]:
    """Two-level fabric (``--ranks-per-node``): every mode in both rank layouts per model, world
    size and device (``dice_ds.plan.fabric``)."""
    k = a.ranks_per_node
    if k < 1:
        raise ValueError(f"--ranks-per-node {k}: use 1 or more")
    rows = []
    for cfg, w, scen, link_name, dev, costs in _cases(a, models):
        intra = parse_link(a.intra_link or link_name)
        for n in gpus:
            if n % k or n // k < 2:
                raise ValueError(f"--gpus {n} with --ranks-per-node {k}: the world must be "
                                 f"2 or more whole nodes of {k}")
            fab = Fabric(intra, parse_link(a.inter_link), k, n // k, a.nic_per_rank)
            for m in _split(a.modes):
                for r in predict_layouts(m, w, costs, fab):
                    rows.append({"model": cfg.name, "gpus": n, "nodes": n // k,
                                 "ranks_per_node": k, "device": dev.name,
                                 "intra": intra.name, "inter": fab.inter.name, **r})
    return rows


def paper_line(rows: list[dict], batch: int, steps: int) -> str | None:
    dice = next((r for r in rows if r["model"] == PAPER["model"] and r["gpus"] == PAPER["gpus"]
                 and r["scenario"] == PAPER["scenario"] and r["mode"] == "dice"), None)
    if not dice:
        return None
    return (f"Paper setting ({PAPER['gpus']} x RTX 4090 over PCIe, XL/2, batch {batch} per GPU, "
            f"{steps} steps): DICE predicted {dice['speedup']:.2f}x over sync EP "
            f"(paper reports {PAPER['reported']}x).")


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    try:
        if a.calibration and not a.validate:
            raise ValueError("--calibration needs --validate BENCH_JSON (the bench it predicts)")
        gpus = [int(x) for x in _split(a.gpus)]
        if a.ranks_per_node is not None:
            layouts = layout_rows(a, _split(a.models), gpus) if a.models else []
            scen = []
        else:
            layouts, scen = None, scenarios(a, _split(a.models), gpus) if a.models else []
        val = None
        if a.validate:

            bench = load(a.validate)
            if a.save_loads:

                print(f"dice-ds plan: wrote {save_loads(bench)}", file=sys.stderr)
            cal = load(a.calibration) if a.calibration else None
            nodes = bool(bench["meta"].get("nodes"))
            if nodes and a.link_from_bench:
                raise ValueError("--link-from-bench: a --nodes bench runs no probe; its links "
                                 "come from --calibration")

            def check(emu=None):
                if nodes:  # each row in the rank layout it ran in (dice_ds/plan/validate_nodes.py)
                    return validate_nodes(bench, not a.no_loads, emu, calib=cal)
                return validate(bench, not a.no_loads, emu, calib=cal,
                                link_from_bench=a.link_from_bench)
            val = check()
            if a.fit_on:

                source = load(a.emulation_from) if a.emulation_from else (cal or bench)
                emu = fit_emulation(source, a.fit_on, use_loads=not a.no_loads)
                fitted = {(r["link"], r["mode"]): r for r in check(emu)}
                for r in val:
                    f = fitted.get((r["link"], r["mode"]))
                    if f and "error" not in f:
                        r["fitted"] = {k: f[k] for k in ("predicted", "error_pct",
                                                         "speedup_predicted", "comm_share")}
                        r["emulation"] = emu
        # a calibration from another machine is named, not silently used (dice_ds/plan/machine.py)
        sources = {flag: load(path) for flag, path in (
            ("--calibration", a.calibration), ("--emulation-from", a.emulation_from),
            ("--bench-json", a.bench_json)) if path}
        target = bench["meta"].get("machine") if val is not None else machine()
        warnings = notes(sources, target, val)
    except (ValueError, KeyError, ConfigError) as e:
        print(f"dice-ds plan: error: {e}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"dice-ds plan: note: {line}", file=sys.stderr)
    cmd = "dice-ds plan " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "efficiency": a.efficiency, "batch": a.batch, "steps": a.steps, "dtype": a.dtype,
            "cfg": not a.no_cfg, "paper": paper_line(scen, a.batch, a.steps),
            "calibration_notes": warnings}
    res = report.write(Path(a.out), scen, val, meta, layouts=layouts)
    print(res["markdown"])
    if meta["paper"]:
        print(meta["paper"])
    if res["plot_why"]:
        print(f"dice-ds plan: {res['plot_why']}", file=sys.stderr)
    print(f"dice-ds plan: results in {a.out} (plan.md, plan.json"
          + (", plan.png)" if res["plot"] else ")"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
