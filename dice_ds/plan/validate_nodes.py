"""``dice-ds plan --validate NODES.json --calibration CAL.json``: a ``dice-ds bench --nodes`` bench
against the two-level fabric model.

Owns ``validate_nodes``: every row of a node bench (``dice_ds.bench.node_bench``: each mode in
both arrangements, the bench 'link' naming the inter-node rate and the arrangement) predicted from
a 2-rank bench of the same job alone (``dice_ds.plan.validate``'s calibration: compute from its DP
runs, scaled by the cores' share; the intra-node link from its ``loopback`` probe, a node's
inter-node link from its probe of the row's rate), in the rank layout the row ran in
(``meta.arrangements``) with ``dice_ds.plan.fabric.predict_layout``; and, per mode, which
arrangement the plan picks (faster predicted) against the one that measured faster.
"""

from __future__ import annotations

from dataclasses import replace

from dice_ds.bench.arrangements import split_label
from dice_ds.ds_config import load_config
from dice_ds.plan.costs import costs_from_phases
from dice_ds.plan.fabric import Fabric, predict_layout
from dice_ds.plan.presets import Link
from dice_ds.plan.validate import (
    compared,
    config_modes,
    cpu_share,
    link_of,
    loads_of,
    pooled_dp,
    ranks_of,
    workload_of,
)


def validate_nodes(bench: dict, use_loads: bool = True, emulation: dict | None = None,
                   links: tuple[str, ...] | None = None, calib: dict | None = None) -> list[dict]:
    """A ``dice-ds bench --nodes`` bench predicted from a 2-rank ``calib`` bench of the same job:
    compute from its DP runs, the intra-node link from its ``loopback`` probe, a node's
    inter-node link from the probe of the row's rate, every row in the layout it ran in
    (``meta.arrangements``) with the two-level fabric model (``dice_ds.plan.fabric``). Each row
    also says which arrangement of its mode the plan picks and which one measured faster."""
    if calib is None:
        raise ValueError("a --nodes bench is validated from a 2-rank bench of the same job: give "
                         "--calibration CAL.json (its probes are the intra- and inter-node links)")
    w, meta = workload_of(bench), bench["meta"]
    if workload_of(calib) != w:
        raise ValueError(f"--calibration runs another job ({calib['meta']['job']!r}) than the "
                         f"validated bench ({meta['job']!r}): use a bench of the same job")
    scale = cpu_share(bench) / cpu_share(calib)
    cores = float(meta.get("cpus") or 0) if cpu_share(bench) > 1 else 0.0
    dp = pooled_dp(calib)
    if dp is None:
        raise ValueError("--calibration has no DP run (the compute calibration)")
    costs = costs_from_phases(dp, w.cfg.depth, w.steps).scaled(scale)

    def scaled(lk: Link) -> Link:
        return replace(lk, cpu_per_byte=lk.cpu_per_byte * scale)

    intra = scaled(link_of(calib, "loopback", emulation))
    custom, preds = config_modes(bench), []
    for name in links or tuple(dict.fromkeys(r["link"] for r in bench["rows"])):
        rate, arr = split_label(name)
        inter = intra if rate == "loopback" else scaled(link_of(calib, rate, emulation))
        fab = Fabric(intra, inter, int(meta["ranks_per_node"]), int(meta["nodes"]))
        loads = loads_of(bench, name) if use_loads else None
        for r in bench["rows"]:
            if r["link"] != name or not r.get("runs"):
                continue
            order = meta["arrangements"][name][r["mode"]]
            try:
                own = load_config(custom[r["mode"]]) if r["mode"] in custom else None
                p = predict_layout(r["mode"], w, costs, fab, order, loads, cores, settings=own)
            except (KeyError, ValueError) as e:
                preds.append({"link": name, "mode": r["mode"], "error": str(e)})
                continue
            preds.append({"link": name, "rate": rate, "arrangement": arr, "layout": order,
                          "mode": r["mode"], **compared(p, r, r["seconds"]),
                          "measured_pooled": False, "calibration": False,
                          "loads": loads is not None, "link_from": "calibration",
                          "link_mbit": inter.bandwidth * 8 / 1e6, "ranks": ranks_of(bench),
                          "cpu_share": scale, "crossing_nodes": p["crossing_nodes"]})
    _speedups_and_picks(preds)
    return preds


def _speedups_and_picks(rows: list[dict]) -> None:
    """Each row's predicted speed-up over sync EP in its arrangement, and, per (rate, mode) run
    in both arrangements, the plan's pick (faster predicted) and the faster measured."""
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        sync = next((x for x in ok if x["link"] == r["link"] and x["mode"] == "sync"), None)
        r["speedup_predicted"] = sync["predicted"] / r["predicted"] if sync else None
    for key in dict.fromkeys((r["rate"], r["mode"]) for r in ok):
        both = [r for r in ok if (r["rate"], r["mode"]) == key]
        if len(both) < 2 or len({r["layout"] for r in both}) < 2:
            continue
        picked = min(both, key=lambda r: r["predicted"])
        faster = min(both, key=lambda r: r["measured"])
        for r in both:
            r["picked"], r["measured_faster"] = r is picked, r is faster
