"""``dice-ds plan --validate BENCH.json``: the model against ``dice-ds bench`` measurements.

At N ranks (``meta.ranks``) with ``--calibration CAL.json`` (a 2-rank bench of the same job), the
N-rank bench is predicted from the calibration alone: compute and link from CAL's rows and probes,
the emulation constant fitted on CAL, no number taken from the N-rank runs but their routing
(rows per rank per (step, layer): what the router did, not how long it took). The machine's cores
are shared: every CPU cost (compute and the network path's CPU) runs ``cpu_share`` = max(1, ranks
/ cores) times slower than with a core per rank, relative to the calibration's own share, and the
link's rates are capped by what the network path's own CPU cost allows on those cores
(``Link.cpu_own_per_byte`` from the calibration's probe, applied per collective by
``dice_ds.plan.sim``). The DP row, whose time does not depend on the link, is compared with the
median of every DP run of the N-rank bench (``measured_pooled``; ``measured_link_row`` keeps the
link's own row).

Owns reading a bench JSON (``dice_ds.bench.report``: ``meta.settings`` -- the job's settings tree,
from which the workload is derived --, ``meta.probes``, ``rows``, ``runs``), calibrating from it per
link the per-layer compute from the DP row's phases (``costs_from_phases``) and the link from the
communication-only probe (``meta.probes[link]``: pipelined and lone throughput,
``dice_ds.bench.probe``), plus the routing loads (rows each rank computed per (step, layer), from
the sync run's run.json or the ``.loads.json`` sidecar: routing, not timing), then predicting every
other row and comparing; and ``fit_emulation``, the one constant fitted on one link's rows (CPU
seconds per byte moved). Also ``cpu_device``: 'this CPU' as a ``Device`` whose throughput is the
bench job's FLOPs over the DP time. A ``dice-ds bench --nodes`` bench is validated by
``dice_ds.plan.validate_nodes`` (the two-level fabric, each row in the rank layout it ran in).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace
from pathlib import Path

from dice_ds.bench.modeconfig import mode_configs_of
from dice_ds.ds_config import load_config
from dice_ds.options import ep_size_of, from_overrides, from_tree, parse_options
from dice_ds.placement import CONTIGUOUS
from dice_ds.plan.costs import costs_from_phases, layer_flops
from dice_ds.plan.placement import expert_rows_of, placed_loads, remote_share
from dice_ds.plan.predict import predict
from dice_ds.plan.presets import LINKS, Device, Link, calibrated_link, parse_link
from dice_ds.workload import Workload, workload_of_settings


def load(path: str) -> dict:
    bench = json.loads(Path(path).read_text())
    bench["_path"] = str(path)
    return bench


def sidecar(bench: dict) -> Path | None:
    """``<bench>.loads.json`` beside the bench JSON: the sync runs' routing rows per link (and,
    under ``expert_rows``, their rows per expert and layer), for
    when the run directories are gone (written by ``dice-ds plan --validate B --save-loads``)."""
    return Path(bench["_path"]).with_suffix(".loads.json") if bench.get("_path") else None


def save_loads(bench: dict) -> Path:
    """Write the sidecar from the sync runs' run.json files (which must still exist)."""
    out = {}
    for link in dict.fromkeys(r["link"] for r in bench["rows"]):
        path = _sync_run_json(bench, link)
        if path is not None and path.is_file():
            ranks = [p["runtime"]["a2a_rows_by_step"]
                     for p in json.loads(path.read_text())["per_rank"]]
            out[link] = {f"{s},{l}": [rk[s][l]["combine"] for rk in ranks]
                         for s in ranks[0] for l in ranks[0][s]}
            rows = expert_rows_of(path, None, link)
            if rows is not None:  # rows per expert: placed modes (dice_ds/plan/placement.py)
                out.setdefault("expert_rows", {})[link] = rows
    dest = sidecar(bench)
    dest.write_text(json.dumps(out) + "\n")
    return dest


def workload_of(bench: dict) -> Workload:
    """The bench job as a Workload: from its settings tree (``meta.settings``), or, for a bench
    JSON written before it had one, from its ``dice-ds sample`` flags (``meta.job``) parsed as the
    sampler parses them."""
    meta = bench["meta"]
    if "settings" in meta:
        return workload_of_settings(from_tree(meta["settings"]))
    return workload_of_settings(parse_options(shlex.split(meta["job"])))


def config_modes(bench: dict) -> dict[str, str]:
    """The bench's ``--mode-config NAME=PATH`` modes (from its command line): NAME -> PATH."""
    return mode_configs_of(bench["meta"].get("command", ""))


def row(bench: dict, link: str, mode: str) -> dict | None:
    return next((r for r in bench["rows"] if r["link"] == link and r["mode"] == mode
                 and r.get("runs")), None)


def link_of(bench: dict, link: str, emulation: dict | None = None) -> Link:
    """The link as the probe measured it; ``emulation`` (``cpu_per_byte``) applies to shaped links
    only. A bench JSON from before the lone-exchange probe gives a pipelined-only link."""
    probe = (bench["meta"].get("probes") or {}).get(link) or {}
    if not probe.get("ok"):
        return LINKS["loopback"] if link == "loopback" else parse_link(link)
    return calibrated_link(link, probe, (emulation or {}).get("cpu_per_byte", 0.0))


_LOADS: dict = {}


def loads_of(bench: dict, link: str):
    """Per-(step, layer) rows each rank computed in the sync run (None if its run.json is gone)."""
    key = (bench.get("_path"), link)
    if key not in _LOADS:
        _LOADS[key] = _load_table(bench, link)
    if _LOADS[key] is None:
        return None
    table, n = _LOADS[key]
    return lambda i, l: table.get((i, l), [1.0] * n)


def _placed(bench: dict, link: str, own, world: int):
    """(loads, share of rows sent away) of a mode whose settings ``own`` place experts otherwise
    than megatron does, from the sync run's rows per expert on ``link``."""
    rows = expert_rows_of(_sync_run_json(bench, link), sidecar(bench), link)
    if rows is None:
        raise ValueError(f"{link}: the sync run recorded no rows per expert (run.json "
                         "expert_placement.expert_rows), needed to predict a placed mode: rerun "
                         "the bench, or --no-loads")
    loads, placement = placed_loads(rows, ep_size_of(from_overrides(own), world),
                                    own["expert_placement"], own.get("expert_replicas", 0))
    return loads, remote_share(placement, rows)


def _sync_run_json(bench: dict, link: str) -> Path | None:
    run = next((r for r in bench.get("runs", []) if r["link"] == link and r["mode"] == "sync"
                and r.get("ok")), None)
    return Path(run["latents"]).parent / "run.json" if run else None


def _load_table(bench: dict, link: str):
    path, rows_by = _sync_run_json(bench, link), None
    if path is not None and path.is_file():
        ranks = [p["runtime"]["a2a_rows_by_step"]
                 for p in json.loads(path.read_text())["per_rank"]]
        rows_by = {(int(s), int(l)): [float(rk[s][l]["combine"]) for rk in ranks]
                   for s in ranks[0] for l in ranks[0][s]}
    elif sidecar(bench) is not None and sidecar(bench).is_file():
        data = json.loads(sidecar(bench).read_text()).get(link)
        if data:
            rows_by = {tuple(int(x) for x in k.split(",")): [float(v) for v in vals]
                       for k, vals in data.items()}
    if not rows_by:
        return None
    table = {k: [x / (sum(v) / len(v)) if sum(v) else 1.0 for x in v] for k, v in rows_by.items()}
    return table, len(next(iter(rows_by.values())))


def pooled_dp(bench: dict) -> dict | None:
    """The DP row of the whole invocation: median seconds and phases over every DP run on every
    link (DP exchanges nothing, so its time does not depend on the link; pooling keeps one noisy
    round on one link out of the compute calibration). None when the bench kept no DP run."""
    import statistics

    runs = [r for r in bench.get("runs", []) if r.get("mode") == "dp" and r.get("ok")
            and r.get("phase_seconds")]
    if not runs:
        return None
    keys = {k for r in runs for k in r["phase_seconds"][0]}
    return {"seconds": statistics.median(r["sampling_seconds"] for r in runs),
            "phases": {k: statistics.median(r["phase_seconds"][0].get(k, 0.0) for r in runs)
                       for k in keys}, "runs": len(runs)}


def ranks_of(bench: dict) -> int:
    """Ranks of every job of the bench (benches before ``--ranks`` ran 2)."""
    return int(bench["meta"].get("ranks", 2))


def cpu_share(bench: dict) -> float:
    """How many times slower one rank's CPU work runs than on a core of its own: max(1, ranks /
    cores) (ranks run one intra-op thread each, ``dice_ds.bench.links``)."""
    return max(1.0, ranks_of(bench) / max(1, int(bench["meta"].get("cpus") or 1)))


def cpu_device(bench: dict, link: str = "loopback") -> Device:
    """'this CPU': the bench job's FLOPs per rank over its DP seconds (efficiency 1 by definition)."""
    w = workload_of(bench)
    dp = row(bench, link, "dp") or next(r for r in bench["rows"] if r["mode"] == "dp")
    flops = sum(layer_flops(w).values()) * w.cfg.depth * w.steps
    return Device("this CPU (bench DP)", flops / dp["seconds"], efficiency=1.0)


def validate(bench: dict, use_loads: bool = True, emulation: dict | None = None,
             links: tuple[str, ...] | None = None, calib: dict | None = None,
             link_from_bench: bool = False) -> list[dict]:
    """Predicted vs measured seconds and speed-up per (link, mode) of the bench; with ``calib``
    (a bench of the same job at its own rank count), compute and link come from ``calib`` only
    (module docstring), and the DP row is a prediction too; ``link_from_bench`` takes the link
    from the validated bench's own communication-only probe instead (still no mode run's time)."""
    w = workload_of(bench)
    src = calib or bench
    if calib is not None and workload_of(calib) != w:
        raise ValueError(f"--calibration runs another job ({calib['meta']['job']!r}) than the "
                         f"validated bench ({bench['meta']['job']!r}): use a bench of the same "
                         "job (dice-ds bench flags other than --ranks and --links)")
    if bench["meta"].get("nodes"):
        raise ValueError("a --nodes bench is validated by dice_ds.plan.validate_nodes")
    world, scale = ranks_of(bench), cpu_share(bench) / cpu_share(src)
    cores = float(bench["meta"].get("cpus") or 0) if cpu_share(bench) > 1 else 0.0
    out = []
    # DP's prediction does not depend on the link, so neither does its best measurement
    dp_pooled = pooled_dp(bench) if calib is not None else None
    for link in links or tuple(dict.fromkeys(r["link"] for r in bench["rows"])):
        dp, sync = pooled_dp(src) or row(src, link, "dp"), row(bench, link, "sync")
        if dp is None or sync is None:
            continue
        costs = costs_from_phases(dp, w.cfg.depth, w.steps).scaled(scale)
        lk = link_of(bench if link_from_bench else src, link, emulation)
        lk = replace(lk, cpu_per_byte=lk.cpu_per_byte * scale,
                     # the N-rank probe's rates were measured with the cores already shared
                     cpu_own_per_byte=0.0 if link_from_bench else lk.cpu_own_per_byte)
        loads = loads_of(bench, link) if use_loads else None
        preds, custom = {}, config_modes(bench)
        for r in bench["rows"]:
            if r["link"] != link or not r.get("runs"):
                continue
            try:
                own = load_config(custom[r["mode"]]) if r["mode"] in custom else None
                # a mode run with another expert placement: its ranks' rows (dice_ds/plan/placement.py)
                placed = (own or {}).get("expert_placement", CONTIGUOUS) != CONTIGUOUS
                mode_loads, remote = (_placed(bench, link, own, world) if placed and use_loads
                                      else (loads, None))
                preds[r["mode"]] = predict(r["mode"], w, costs, lk, world, mode_loads,
                                           settings=own, cores=cores, remote_share=remote)
            except (KeyError, ValueError) as e:
                preds[r["mode"]] = {"error": str(e)}
        t_sync = preds.get("sync", {}).get("batch_seconds")
        for m, p in preds.items():
            meas = row(bench, link, m)
            if "error" in p:
                out.append({"link": link, "mode": m, "error": p["error"]})
                continue
            sec, measured = p["batch_seconds"], meas["seconds"]
            pooled = m == "dp" and dp_pooled is not None
            if pooled:
                measured = dp_pooled["seconds"]
            out.append({"link": link, "mode": m, **compared(p, meas, measured),
                        "measured_pooled": pooled,
                        "speedup_predicted": t_sync / sec if t_sync else None,
                        "calibration": m == "dp" and calib is None, "loads": loads is not None,
                        "link_from": "bench" if link_from_bench else "calibration",
                        "link_mbit": lk.bandwidth * 8 / 1e6, "ranks": world,
                        "cpu_share": scale})
    return out


def compared(p: dict, meas: dict, measured: float) -> dict:
    """A validation row's prediction ``p`` against the bench row ``meas`` (``measured``: the
    seconds it is compared with): time, error, speed-up, exposed comm, bytes and cache."""
    sec = p["batch_seconds"]
    return {"measured": measured, "predicted": sec,
            "error_pct": 100 * (sec - measured) / measured,
            "measured_link_row": meas["seconds"], "speedup_measured": meas.get("speedup"),
            "comm_share": p["comm_share"], "bytes_predicted": p["bytes_per_rank"],
            "bytes_measured": max(meas.get("bytes_remote_per_rank") or [0]),
            "cache_predicted": p["memory"]["stale_cache"] + p["memory"]["kv_cache"],
            "cache_measured": meas.get("cache_peak_bytes")}


CPU_PER_BYTE_GRID = tuple(i * 2.5e-9 for i in range(81))
"""0 to 200 ns per byte sent or received, in 2.5 ns steps."""


def fit_emulation(bench: dict, link: str, use_loads: bool = True) -> dict:
    """The one emulation constant, ``cpu_per_byte`` (seconds of compute a byte sent or received
    costs the rank: rate-independent, so it carries over to another rate), that minimises the
    root-mean-square % error over the non-DP rows of ONE shaped link (least squares: one noisy
    row does not pull it as a largest-error fit would); grid search over ``CPU_PER_BYTE_GRID``.
    The other links are then predicted with it (hold-out)."""
    best = None
    for c in CPU_PER_BYTE_GRID:
        errs = [r["error_pct"] for r in validate(bench, use_loads, {"cpu_per_byte": c},
                                                  links=(link,))
                if "error" not in r and not r["calibration"]]
        rms = math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else 0.0
        if best is None or rms < best[0] - 1e-9:
            best = (rms, c, max((abs(e) for e in errs), default=0.0))
    return {"cpu_per_byte": best[1], "fitted_on": link, "rms_error_pct": best[0],
            "max_abs_error_pct": best[2]}
