"""``dice-ds bench``: every parallel mode, the same N-rank job, on loopback and emulated slow links.

Owns the subcommand: flags, the interleaved run order, the console progress and the output files.
``--ranks N`` (2 to 16) ranks, each in its own network namespace on one bridge, each rank's link
shaped to the rate (``dice_ds.bench.links``); from 4 ranks the EP x SP mesh modes run too.
For each link (``--links loopback,300mbit,100mbit``): the namespaces are shaped to the rate, every
mode runs ``--rounds`` times round-robin (dp sync displaced ... dp sync ...; slow drift of the
machine's load spreads over all modes), and after the first round the communication-only probe
replays the sync run's exchange sizes. Results go to ``--out``: bench.json (every run), bench.md
(the table), bench.png (speed-up vs PSNR per link) and one directory per run with the ranks' logs.
``--nodes M --ranks-per-node K`` runs on emulated nodes instead, every mode in both rank layouts
(``dice_ds.bench.node_bench``).

Settings travel as trees: the job (``dice_ds.bench.jobs.job_of``: the bench's flags, and the extra
``dice-ds sample`` flags after ``--`` parsed once) with a mode's settings and the run's sample
directory over it is
written to each run's ``settings.json`` (``dice_ds.ds_config.write_config``) and sampled with
``--config`` that file; bench.json records the job's tree
(``meta.settings``), from which ``dice-ds plan --validate`` derives the workload it predicts.

Nothing is timed by this process: numbers are what the runs (run.json) and the probe report.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dice_ds.bench import launch, links, modeconfig, node_bench, probe, report
from dice_ds.bench.jobs import job_of, run_config, run_settings
from dice_ds.bench.modeconfig import split_mode_config
from dice_ds.config import ConfigError
from dice_ds.ds_config import Settings, load_tree, to_json
from dice_ds.modes import MESH_MODES, by_key
from dice_ds.options import flags_of, given
from dice_ds.workload import messages, workload_of_settings

DEFAULT_MODES = "dp,sync,displaced,interweaved,dice,dice-bf16,sp,sp-async"
MAX_RANKS = 16


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dice-ds bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Speed of every parallel mode at N ranks on loopback and emulated links "
                    "(network namespaces on a bridge + tbf; root), with the overlap bound, the "
                    "CPU-aware bound and PSNR vs sync EP.")
    p.add_argument("--ranks", type=int, default=2,
                   help=f"ranks of every job (2 to {MAX_RANKS}), one network namespace each")
    p.add_argument("--nodes", type=int, default=None, metavar="M",
                   help="emulated nodes instead (with --ranks-per-node K): M namespaces of K "
                        "ranks, --links shaping the links between nodes; every mode with groups "
                        "of one node's size, in both rank layouts (dice_ds/bench/node_bench.py)")
    p.add_argument("--ranks-per-node", type=int, default=None, metavar="K",
                   help="ranks of each --nodes node")
    p.add_argument("--links", default="loopback,300mbit,100mbit",
                   help="comma-separated: 'loopback' and/or tc rates (e.g. 300mbit)")
    p.add_argument("--modes", default=None,
                   help="comma-separated mode keys of dice_ds/modes.py (dp is the compute time; "
                        f"default {DEFAULT_MODES}, plus {','.join(MESH_MODES)} from 4 ranks)")
    modeconfig.add_option(p)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per link (>= 1)")
    p.add_argument("--burst", default="small",
                   help="tbf burst: 'small' = max(8kb, 0.4 ms of line rate), or a tc size "
                        "such as 256kb (the older, bursty setting)")
    p.add_argument("--sysctl", action="append", default=None, metavar="KEY=VALUE",
                   help="sysctl set inside both namespaces (repeatable; default: "
                        f"{' '.join(links.DEFAULT_SYSCTLS)}; --sysctl '' keeps the kernel's)")
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: random weights)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2, help="images per rank (CFG doubles it)")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds per run")
    p.add_argument("--out", default=None, help="output directory (default: a new temp dir)")
    p.add_argument("--rerender", metavar="DIR", default=None,
                   help="re-make bench.md/.json/.png of an earlier --out DIR from its runs' "
                        "run.json files (no run)")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after '--': extra dice-ds sample flags for every run")
    return p


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through Links' and run_pair's cleanup


def _check(a, p) -> tuple[list[str], list[str]]:
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if a.nodes is not None:
        node_bench.check(a, p)
    elif a.ranks_per_node is not None:
        p.error("--ranks-per-node needs --nodes M")
    if not 2 <= a.ranks <= MAX_RANKS:
        p.error(f"--ranks {a.ranks}: use 2 to {MAX_RANKS}")
    if a.modes is None:
        a.modes = DEFAULT_MODES + ("," + ",".join(MESH_MODES) if a.ranks >= 4 else "")
    for name in ("steps", "batch", "image_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    a.custom = _mode_configs(a.mode_config, p)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in modes:
        if m in a.custom:
            continue
        try:
            by_key(m)
        except KeyError as e:
            p.error(str(e.args[0]) + " (or name a --mode-config)")
    modes += [m for m in a.custom if m not in modes]
    mesh = [m for m in modes if m in MESH_MODES]
    if mesh and (a.ranks < 4 or a.ranks % 2):
        p.error(f"--modes {','.join(mesh)}: an EP x SP mesh needs an even --ranks >= 4")
    if "sync" not in modes:
        p.error("--modes must include 'sync' (the speed-up reference)")
    link_list = [x.strip() for x in a.links.split(",") if x.strip()]
    for link in link_list:
        if link != "loopback":
            try:
                links.rate_bits(link)
            except ValueError as e:
                p.error(str(e))
    if a.extra and a.extra[0] == "--":
        a.extra = a.extra[1:]
    try:
        a.job = job_of(a)
    except ConfigError as e:
        p.error(f"extra sample flags {' '.join(a.extra)!r}: {e}")
    return modes, link_list


def _gather_bytes(job: Settings, modes: list[str]) -> int:
    """K/V bytes a rank contributes per layer to sync SP's all-gather in this job (0 without an SP
    mode)."""
    if not any(m in ("sp", "sp-async", *MESH_MODES) for m in modes):
        return 0
    # one rank's own K/V (what it contributes to each gather) is the SP-size-2 received bytes
    return int(messages(workload_of_settings(job), 1, 2).kv)


def _mode_configs(items: list[str], p) -> dict[str, str]:
    """``--mode-config NAME=PATH`` -> {NAME: PATH}; the file is validated now."""
    out: dict[str, str] = {}
    for item in items:
        if split_mode_config(item) is None:
            p.error(f"--mode-config {item!r}: use NAME=CONFIG.json")
        name, path = split_mode_config(item)
        try:
            by_key(name)
            p.error(f"--mode-config {name!r}: that is a built-in mode key; choose another name")
        except KeyError:
            pass
        if name in out:
            p.error(f"--mode-config {name!r} given twice")
        try:
            load_tree(path)
        except (ConfigError, OSError) as e:
            p.error(f"--mode-config {name}={path}: {e}")
        out[name] = path
    return out


def _first_error(log_dir: str, ranks: int) -> str:
    """The first rank's ``error:`` line, else the last line of the first non-empty log."""
    last = None
    for rank in range(ranks):
        try:
            lines = Path(log_dir, f"rank{rank}.log").read_text().strip().splitlines()
        except OSError:
            continue
        err = [ln for ln in lines if "error:" in ln]
        if err:
            return err[-1][:200]
        last = last or (lines[-1][:200] if lines else None)
    return last or "no log"


def _git_commit() -> str:
    r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short",
                        "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def rerender(out: Path) -> int:
    """Rebuild the report of an earlier invocation from the run.json files it kept."""
    data = json.loads((out / "bench.json").read_text())
    runs = []
    for r in data["runs"]:
        info = Path(r["latents"]).with_name("run.json") if r.get("latents") else None
        if r.get("ok") and info is not None and info.exists():
            r = {**r, **launch.record_of(json.loads(info.read_text()), info.parent)}
        runs.append(r)
    rows = report.summarise(runs, data["meta"]["probes"])
    res = report.write(out, rows, runs, data["meta"])
    print(res["markdown"])
    _tell_outputs(out, res)
    return 0


def _tell_outputs(out: Path, res: dict) -> None:
    """Where the results are; one actionable line first when bench.png could not be drawn."""
    if res["plot_why"]:
        print(f"dice-ds bench: {res['plot_why']}", file=sys.stderr)
    print(f"dice-ds bench: results in {out} (bench.json, bench.md"
          + (", bench.png)" if res["plot"] else ")"), file=sys.stderr)


def _progress(t_start: float, rounds: int, ranks: int):
    """The console line of each finished run (the first round's failure marks the mode
    unavailable for the rest of the link)."""
    def show(rec: dict, rnd: int, load: float, unavailable: dict) -> None:
        if rec["ok"]:
            note = f"{rec['sampling_seconds']:7.2f} s"
        else:
            note = f"FAILED ({rec['why']}: {_first_error(rec['logs'], ranks)})"
            if rnd == 0:
                unavailable[rec["mode"]] = note
        print(f"[bench {time.monotonic() - t_start:6.0f} s] {rec['link']:9} round {rnd + 1}/"
              f"{rounds} {rec['mode']:12} {note}  (load {load:.1f})", file=sys.stderr,
              flush=True)
    return show


def _flat(a, modes, link_list, out, sysctls, why, show) -> dict:
    """The flat fabric: every rank its own namespace, each link shaped in turn, the probe after
    the first round."""
    runs, probes, loads, shaping, unavailable = [], {}, [], {}, {}
    port = 29700 + os.getpid() % 1000
    with links.Links(use_netns=why is None, sysctls=sysctls, ranks=a.ranks) as net:
        for link in link_list:
            net.shape(link, a.burst)
            if link != "loopback":
                shaping[link] = (f"tbf rate {link} burst {net.burst_used[link]} latency 100ms"
                                 + (f"; {', '.join(sysctls)}" if sysctls else ""))
            for rnd in range(a.rounds):
                for m in modes:
                    if m in unavailable:
                        continue
                    port += 1
                    loads.append(os.getloadavg()[0])
                    run_dir = out / link / m / f"r{rnd}"
                    try:
                        run_argv = run_config(run_settings(a, a.job, m), run_dir)
                    except ConfigError as e:
                        run_argv = None
                        rec = {"ok": False, "why": str(e), "logs": str(run_dir)}
                    if run_argv is not None:
                        rec = launch.sample_run(net, link, port, run_argv, run_dir, a.run_timeout)
                    rec.update(link=link, mode=m, round=rnd)
                    runs.append(rec)
                    show(rec, rnd, loads[-1], unavailable)
                if rnd == 0:
                    sync = next((r for r in runs if r["link"] == link and r["mode"] == "sync"
                                 and r["ok"]), None)
                    if sync and max(sync["bytes_remote"]) > 0:
                        calls = max(1, max(sync["exchanges"]))
                        port += 1
                        probes[link] = launch.probe_run(
                            net, link, port, int(max(sync["bytes_remote"]) / calls), calls,
                            out / link / "probe", a.run_timeout,
                            gather_bytes=_gather_bytes(a.job, modes))
                        pr = probes[link]
                        print(f"[bench] {link:9} probe: " + (
                            f"{pr['seconds']:.2f} s for {calls} exchanges "
                            f"({pr['throughput_bits'] / 1e6:.0f} Mbit/s pipelined, "
                            f"{pr['lone_throughput_bits'] / 1e6:.0f} lone)" if pr["ok"]
                            else f"FAILED ({pr['why']})"), file=sys.stderr, flush=True)
    return {"runs": runs, "probes": probes, "loads": loads, "shaping": shaping,
            "unavailable": unavailable}


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.rerender:
        return rerender(Path(a.rerender))
    modes, link_list = _check(a, p)
    shaped = [x for x in link_list if x != "loopback"]
    why = links.available()
    if why and a.nodes is not None:
        print(f"dice-ds bench: --nodes skipped: {why}", file=sys.stderr)
        return 0
    if why and shaped:
        print(f"dice-ds bench: shaped links {shaped} skipped: {why}", file=sys.stderr)
        link_list = [x for x in link_list if x == "loopback"]
        if not link_list:
            return 0
    out = Path(a.out or tempfile.mkdtemp(prefix="dice_bench."))
    signal.signal(signal.SIGTERM, _terminate)
    job = a.job
    t_start = time.monotonic()
    sysctls = (links.DEFAULT_SYSCTLS if a.sysctl is None
               else tuple(kv for kv in a.sysctl if kv.strip()))
    show = _progress(t_start, a.rounds, a.ranks)
    if a.nodes is not None:
        res = node_bench.run(a, modes, link_list, out, sysctls, show)
        res["probes"], extra = {}, node_bench.meta(a, res)
    else:
        res, extra = _flat(a, modes, link_list, out, sysctls, why, show), {}
    runs, probes, loads = res["runs"], res["probes"], res["loads"]
    rows = report.summarise(runs, probes)
    cmd = "dice-ds bench " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": _git_commit(), "cpus": os.cpu_count(), "machine": probe.machine(),
            "job": " ".join(flags_of(given(job))), "settings": to_json(job),
            "ranks": a.ranks, "threads_per_rank": "1 intra-op (OMP_NUM_THREADS=1) + gloo's",
            "load_min": min(loads or [0]), "load_max": max(loads or [0]),
            "shaping": res["shaping"], "probes": probes, "unavailable": res["unavailable"],
            "rounds": a.rounds, "wall_seconds": time.monotonic() - t_start, **extra}
    res_report = report.write(out, rows, runs, meta)
    print(res_report["markdown"])
    for m, note in res["unavailable"].items():
        print(f"mode {m} not available: {note}", file=sys.stderr)
    _tell_outputs(out, res_report)
    return 0 if any(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
