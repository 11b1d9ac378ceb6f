"""Results of ``dice-ds bench``: medians, speed-up, the overlap bound, quality, tables and the plot.

Owns turning the list of run records into one summary per (link, mode) and rendering it.
Definitions (docs/benchmarks.md "Method"):

- time: median ``sampling_seconds`` (slower rank) over the rounds; speed-up = median sync EP time /
  median mode time;
- T_compute: the median time of the DP run (same job, no exchange); T_comm(mode): the probe's
  seconds for the sync run's exchanges on this link, scaled by the mode's remote bytes over sync's
  (the slower rank); bound = T_sync / max(T_compute, T_comm(mode)), the speed-up perfect overlap
  would give; % of bound = speed-up / bound;
- schedule bound: the same with the run's own sync work counted as it must run, not overlapped:
  T_sync / (f * T_sync + (1 - f) * max(T_compute, T_comm)), f = the share of (step, layer) calls
  that are synchronous (the first step of every async mode); only for modes that move the same
  bytes as sync EP (for DICE's skipped slots or a bf16 payload f * T_sync is not what its sync
  calls cost);
- CPU-aware bound: the exchanges also cost the CPU they are meant to hide behind (gloo's threads, the
  kernel's TCP work). The probe measures its ranks' own CPU seconds (their rusage: all threads)
  over its exchanges, ``cpu_per_byte_rank`` per byte a rank sends, so that other work on the
  machine cannot inflate it (the machine-wide busy seconds, ``cpu_per_byte``, are reported too: the
  kernel's softirq work is not always charged to the ranks); a run's wall seconds per CPU second of
  one rank, k = T_compute / (DP rank CPU seconds), turns CPU into wall time on this machine (about
  W / cores once the ranks outnumber the cores). C_comm(mode) = k x cpu_per_byte_rank x the mode's
  remote bytes;
  cpu bound = T_sync / max(T_compute + C_comm, T_comm); % of cpu bound = speed-up / cpu bound;
- what is left (``gap``): the mode's time minus max(T_compute + C_comm, T_comm), split into the
  waits rank 0 measured (counts, dispatch, combine, drain), blocking exchanges (its sync calls'
  counts, dispatch and combine phases beyond DP's local permutations: the sync steps and the sync
  layers of DICE's selective synchronisation, which no overlap can hide), extra CPU (k x (the
  mode's rank CPU - DP's - the probe's own rank CPU per byte x the mode's bytes): duplicated or
  Python work beyond
  the compute and the exchanges' own process CPU; the ranks' process CPU, not the machine's, on
  both sides) and the rest (the kernel's share of C_comm, scheduling between ranks sharing cores,
  what neither explains);
- other work: each run records the machine's busy CPU beyond its own processes' CPU
  (``dice_ds.bench.probe.foreign_cpu``); modes with a run above ``FOREIGN_FLAG`` are flagged;
- bytes: EP all-to-all bytes a rank sent to other ranks plus its SP all-gather bytes; cache: held
  stale EP exchanges plus displaced SP K/V buffers (peak, max over ranks);
- phases: rank 0's exclusive seconds per phase summed over the run, median over rounds;
- bytes: remote all-to-all bytes per rank and their sum; cache: peak stale-exchange bytes (max rank);
- PSNR: of the mode's latents against the sync EP latents of the same round and seeds, with the
  sync latents' peak-to-peak range as the signal (inf when identical);
- expert balance (``expert_balance``): the busiest EP rank's expert rows over the mean, per MoE
  layer, from the run's routing counts (run.json ``expert_placement``, dice_ds/placement.py):
  the worst and the median layer, and the placement the run used.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

from dice_ds.bench.probe import own_cpu_per_byte

NO_OVERLAP = ("dp", "sync", "sp", "ep-sp")
"""Modes without stale exchanges: no overlap bound (dp is T_compute, sync the reference)."""
PHASES = ("router", "preprocess", "shared", "dispatch", "experts", "combine", "postprocess",
          "wait_counts", "wait_dispatch", "wait_combine", "drain")
WAITS = ("wait_counts", "wait_dispatch", "wait_combine", "drain")
BLOCKING = ("preprocess", "dispatch", "combine")
"""Phases that hold a sync call's blocking exchanges (counts, dispatch, combine); in DP they are
only the local permutations, which are subtracted."""


def _rank_cpu(run: dict) -> float | None:
    """Mean CPU seconds of one run's ranks over the sampling loops (None before they were kept)."""
    cpu = [c for c in run.get("cpu_seconds") or [] if c]
    return sum(cpu) / len(cpu) if cpu else None


def cpu_terms(mine: list[dict], probe: dict, t_dp: float | None) -> tuple:
    """(k, machine CPU per byte, the ranks' own CPU per byte, DP rank CPU seconds) of one link;
    Nones where not measured. The ranks' own share (their processes' user + system seconds in the
    probe) is what a run's own CPU seconds can be compared with: the kernel's softirq work is not
    always charged to the process that caused it."""
    dp_cpu = _median([_rank_cpu(r) for r in mine if r["mode"] == "dp" and r["ok"]])
    k = t_dp / dp_cpu if t_dp and dp_cpu else None
    if not probe.get("ok"):
        return k, None, None, dp_cpu
    return k, probe.get("cpu_per_byte"), own_cpu_per_byte(probe), dp_cpu


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def psnr(ref_path: str, path: str) -> float | None:
    try:
        ref = np.load(ref_path)["arr_0"].astype(np.float64)
        out = np.load(path)["arr_0"].astype(np.float64)
    except (OSError, KeyError, ValueError):
        return None
    if ref.shape != out.shape:
        return None
    mse = float(np.mean((ref - out) ** 2))
    peak = float(ref.max() - ref.min())
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak * peak / mse) if peak > 0 else None  # constant reference: none


def summarise(runs: list[dict], probes: dict) -> list[dict]:
    """One row per (link, mode) in the order they were run."""
    rows = []
    links = list(dict.fromkeys(r["link"] for r in runs))
    for link in links:
        mine = [r for r in runs if r["link"] == link]
        modes = list(dict.fromkeys(r["mode"] for r in mine))
        med = {m: _median([r["sampling_seconds"] for r in mine if r["mode"] == m and r["ok"]])
               for m in modes}
        sync_runs = [r for r in mine if r["mode"] == "sync" and r["ok"]]
        sync_bytes = max(sync_runs[0]["bytes_remote"]) if sync_runs else None
        probe = probes.get(link) or {}
        t_probe = probe.get("seconds") if probe.get("ok") else None
        t_sync, t_dp = med.get("sync"), med.get("dp")
        k, cpb, own_cpb, dp_cpu = cpu_terms(mine, probe, t_dp)
        dp_ok = [r for r in mine if r["mode"] == "dp" and r["ok"] and r["phase_seconds"]]
        dp_phases = {p: _median([r["phase_seconds"][0].get(p, 0.0) for r in dp_ok])
                     for p in BLOCKING} if dp_ok else {}
        for m in modes:
            ok = [r for r in mine if r["mode"] == m and r["ok"]]
            row = {"link": link, "mode": m, "runs": len(ok),
                   "failed": sum(not r["ok"] for r in mine if r["mode"] == m)}
            if not ok:
                rows.append(row)
                continue
            secs = [r["sampling_seconds"] for r in ok]
            bytes_remote = max(ok[0]["bytes_remote"] or [0])
            t_comm = (t_probe * bytes_remote / sync_bytes
                      if t_probe and sync_bytes and m != "dp" else (0.0 if m == "dp" else None))
            speed = t_sync / med[m] if t_sync else None
            bound = (t_sync / max(t_dp, t_comm) if t_sync and t_dp and t_comm is not None
                     and m not in NO_OVERLAP else None)
            f = ok[0].get("sync_fraction")
            floor = max(t_dp, t_comm) if t_dp and t_comm is not None else None
            # sync work then costs f * T_sync (routing shifts rows between ranks by a few %)
            same_bytes = abs(bytes_remote - sync_bytes) <= 0.03 * sync_bytes
            sched = (t_sync / (f * t_sync + (1 - f) * floor)
                     if bound and f is not None and floor and same_bytes else None)
            ref = next((r for r in sync_runs if r["round"] == ok[0]["round"]), None)
            phases = {p: _median([r["phase_seconds"][0].get(p, 0.0) if r["phase_seconds"]
                                  else 0.0 for r in ok]) for p in PHASES}
            # the ranks' own CPU per byte (their rusage in the probe): other work on the machine
            # cannot inflate it (the machine-wide figure, ``cpu_per_byte``, is kept for reference)
            c_comm = (k * own_cpb * bytes_remote if k and own_cpb is not None and m != "dp"
                      else None)
            blocking = (max(0.0, sum(phases[p] - dp_phases.get(p, 0.0) for p in BLOCKING))
                        if dp_phases and m != "dp" else None)
            cpu_bound = (t_sync / max(t_dp + c_comm, t_comm) if bound and c_comm is not None
                         else None)
            gap = None
            if cpu_bound:
                mode_cpu = _median([_rank_cpu(r) for r in ok])
                floor_cpu = max(t_dp + c_comm, t_comm)
                waits = sum(phases[p] for p in WAITS)
                extra = (k * (mode_cpu - dp_cpu - own_cpb * bytes_remote)
                         if mode_cpu and dp_cpu and own_cpb is not None else None)
                rest = med[m] - floor_cpu - waits - blocking - (extra or 0.0)
                gap = {"seconds": med[m] - floor_cpu, "waits": waits, "blocking": blocking or 0.0,
                       "extra_cpu": extra, "rest": rest}
            row.update({
                "seconds": med[m], "min": min(secs), "max": max(secs),
                "speedup": speed, "t_compute": t_dp, "t_comm": t_comm, "bound": bound,
                "pct_of_bound": speed / bound if speed and bound else None,
                "sync_fraction": f, "schedule_bound": sched,
                "pct_of_schedule_bound": speed / sched if speed and sched else None,
                "phases": phases, "c_comm": c_comm, "cpu_bound": cpu_bound,
                "pct_of_cpu_bound": speed / cpu_bound if speed and cpu_bound else None,
                "wall_per_cpu": k, "cpu_per_byte": cpb, "cpu_per_byte_rank": own_cpb, "gap": gap,
                "cpu_seconds_rank": _median([_rank_cpu(r) for r in ok]),
                "blocking": blocking,
                "foreign_cpu_share": foreign_share(ok),
                "bytes_remote_per_rank": ok[0]["bytes_remote"],
                "bytes_remote_total": sum(ok[0]["bytes_remote"]),
                "cache_peak_bytes": max(ok[0]["cache_peak_bytes"] or [0]),
                "sp_stats": ok[0].get("sp_stats"),
                "psnr_vs_sync": psnr(ref["latents"], ok[0]["latents"]) if ref and m != "sync"
                else None,
                "seconds_all": secs,
            })
            row.update(expert_balance(ok))
            rows.append(row)
    return rows


def expert_balance(ok: list[dict]) -> dict:
    """The busiest EP rank's expert rows over the mean (worst and median MoE layer) and the
    placement of a mode's first successful run (the routing is the same in every round)."""
    rec = ok[0].get("expert_balance") or {}
    return {"expert_imbalance_max": rec.get("imbalance_max"),
            "expert_imbalance_median": rec.get("imbalance_median"),
            "expert_placement": rec.get("placement")}


def balance_table(rows: list[dict], link: str) -> list[str]:
    """Per mode: the busiest rank's expert rows over the mean (module doc)."""
    mine = [r for r in rows if r["link"] == link and r.get("expert_imbalance_max") is not None]
    if not mine:
        return []
    out = ["", "Expert balance: the busiest EP rank's routed rows over the mean, per MoE layer",
           "", "| mode | placement | worst layer | median layer |", "|---|---|---:|---:|"]
    for r in mine:
        out.append(f"| {r['mode']} | {r['expert_placement'] or '-'} "
                   f"| {r['expert_imbalance_max']:.2f}x | {r['expert_imbalance_median']:.2f}x |")
    return out


FOREIGN_FLAG = 0.25
"""A run whose machine spent more than this share of the ranks' own CPU on other work is
flagged: its times include competition the bench did not cause."""


def foreign_share(runs: list[dict]) -> float | None:
    """The largest share, over ``runs``, of CPU the machine spent on other work during a run over
    the run's own processes' CPU (``dice_ds.bench.probe.foreign_cpu``); None where not measured."""
    shares = [r["cpu"]["foreign"] / r["cpu"]["own"] for r in runs
              if (r.get("cpu") or {}).get("foreign") is not None and r["cpu"]["own"] > 0]
    return max(shares) if shares else None


def _f(x, fmt="{:.2f}", none="-"):
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "exact"
    return fmt.format(x)


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"`{meta['command']}`", "",
           f"{meta['date']}, commit {meta['commit']}, {meta.get('ranks', 2)} ranks "
           f"({meta.get('threads_per_rank', '1 intra-op thread')} per rank) on {meta['cpus']} "
           f"CPU cores, load average {meta['load_min']:.1f}-{meta['load_max']:.1f} during the "
           f"runs; job: {meta['job']}", ""]
    for link in dict.fromkeys(r["link"] for r in rows):
        shaping = meta["shaping"].get(link, "")
        probe = meta["probes"].get(link) or {}
        thr = (f"; probe {probe['throughput_bits'] / 1e6:.0f} Mbit/s per direction"
               if probe.get("ok") else "")
        out += [f"### {link}{(' (' + shaping + ')') if shaping else ''}{thr}", "",
                "| mode | runs | s (median) | min-max | speed-up | bound | % of bound | "
                "sched. bound | % of sched. |"
                "T_comm s | remote MB/rank | cache KB | PSNR dB | router | counts | dispatch | "
                "experts | combine | wait disp. | wait comb. | wait counts |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                "---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["link"] != link:
                continue
            if not r["runs"]:
                out.append(f"| {r['mode']} | 0 | failed |" + " |" * 18)
                continue
            ph = r["phases"]
            out.append(
                f"| {r['mode']} | {r['runs']} | {r['seconds']:.2f} | {r['min']:.2f}-{r['max']:.2f} "
                f"| {_f(r['speedup'], '{:.2f}x')} | {_f(r['bound'], '{:.2f}x')} "
                f"| {_f(r['pct_of_bound'] and 100 * r['pct_of_bound'], '{:.0f} %')} "
                f"| {_f(r['schedule_bound'], '{:.2f}x')} "
                f"| {_f(r['pct_of_schedule_bound'] and 100 * r['pct_of_schedule_bound'], '{:.0f} %')} "
                f"| {_f(r['t_comm'])} | {r['bytes_remote_per_rank'][0] / 1e6:.1f} "
                f"| {r['cache_peak_bytes'] / 1e3:.0f} | {_f(r['psnr_vs_sync'], '{:.1f}')} | "
                + " | ".join(f"{ph[p]:.2f}" for p in ("router", "preprocess", "dispatch",
                                                       "experts", "combine", "wait_dispatch",
                                                       "wait_combine", "wait_counts")) + " |")
        out += [""] + blocking_lines(rows, link) + cpu_table(rows, link, probe)
        out += balance_table(rows, link)
    return "\n".join(out)


def blocking_lines(rows: list[dict], link: str) -> list[str]:
    """Per mode of one link: the seconds its sync calls' exchanges blocked (beyond DP's local
    permutations), and a warning for modes whose runs shared the machine with other work."""
    mine = [r for r in rows if r["link"] == link and r.get("runs")]
    out = []
    block = [f"{r['mode']} {r['blocking']:.2f}" for r in mine if r.get("blocking") is not None]
    if block:
        out += ["Blocking seconds (sync calls' counts, dispatch and combine beyond DP's local "
                "permutations, rank 0): " + ", ".join(block) + ".", ""]
    busy = [f"{r['mode']} ({100 * r['foreign_cpu_share']:.0f} %)" for r in mine
            if (r.get("foreign_cpu_share") or 0.0) > FOREIGN_FLAG]
    if busy:
        out += [f"**Other work on the machine**: runs of {', '.join(busy)} saw more than "
                f"{100 * FOREIGN_FLAG:.0f} % of their own CPU spent on other processes; their "
                "times are not comparable.", ""]
    return out


def cpu_table(rows: list[dict], link: str, probe: dict) -> list[str]:
    """The CPU-aware bound of one link and what is left between each mode and it (module doc)."""
    mine = [r for r in rows if r["link"] == link and r.get("cpu_bound")]
    if not mine:
        return []
    r0 = mine[0]
    head = (f"CPU-aware bound: the probe's exchanges cost {r0['cpu_per_byte_rank'] * 1e9:.1f} ns "
            f"of the ranks' own CPU per byte a rank sends (their rusage; the whole machine: "
            f"{(r0['cpu_per_byte'] or 0) * 1e9:.1f} ns, "
            f"{probe.get('cpu_seconds_machine', 0):.2f} s busy "
            f"for {probe['bytes_per_call'] * probe['calls'] / 1e6:.1f} MB per rank); wall seconds "
            f"per rank CPU second k = {r0['wall_per_cpu']:.2f}")
    out = [head, "", "| mode | speed-up | C_comm s | CPU bound | % of CPU bound | left s | waits s "
           "| blocking s | extra CPU s | rest s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in mine:
        g = r["gap"] or {}
        out.append(f"| {r['mode']} | {_f(r['speedup'], '{:.2f}x')} | {_f(r['c_comm'])} "
                   f"| {_f(r['cpu_bound'], '{:.2f}x')} "
                   f"| {_f(r['pct_of_cpu_bound'] and 100 * r['pct_of_cpu_bound'], '{:.0f} %')} "
                   f"| {_f(g.get('seconds'))} | {_f(g.get('waits'))} | {_f(g.get('blocking'))} "
                   f"| {_f(g.get('extra_cpu'))} "
                   f"| {_f(g.get('rest'))} |")
    return out + [""]


def no_matplotlib(png: str) -> str:
    """Why a PNG was not drawn, with the command that installs matplotlib into this interpreter."""
    return (f"matplotlib is not installed, so no {png}: {shlex.quote(sys.executable)} -m pip "
            f"install 'dice_ds[bench]' (or, in a dice_ds checkout: bash scripts/setup.sh bench)")


def plot(rows: list[dict], path: Path) -> str | None:
    """Speed-up vs PSNR per link (the paper's trade-off figure); returns why not, if not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return no_matplotlib(path.name)
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 3.6), squeeze=False)
    for ax, link in zip(axes[0], links):
        pts = [r for r in rows if r["link"] == link and r.get("speedup")]
        finite = [r["psnr_vs_sync"] for r in pts if r.get("psnr_vs_sync") not in (None, math.inf)]
        top = (max(finite) + 5) if finite else 60
        for r in pts:
            q = r.get("psnr_vs_sync")
            q = top if q is None or math.isinf(q) else q
            ax.scatter(r["speedup"], q)
            ax.annotate(r["mode"], (r["speedup"], q), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.set_title(link)
        ax.set_xlabel("speed-up over sync EP")
        ax.set_ylabel(f"PSNR vs sync (dB; exact plotted at {top:.0f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(out_dir: Path, rows: list[dict], runs: list[dict], meta: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs},
                                                   indent=1, default=str))
    md = markdown(rows, meta)
    (out_dir / "bench.md").write_text(md + "\n")
    why = plot(rows, out_dir / "bench.png")
    return {"markdown": md, "plot": None if why else str(out_dir / "bench.png"), "plot_why": why}
