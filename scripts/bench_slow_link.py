"""Driver of ``scripts/bench_slow_link.sh``: 2-rank ``dice_ds.sample`` runs across two network namespaces.

Owns launching the two ranks of one run (rank 0 in namespace A, rank 1 in namespace B, or both in A
over its loopback), the interleaved order of modes x rounds for one link, the time budget, and the
report (medians over rounds, speed-up over sync EP, per-phase seconds of rank 0). The namespaces,
the veth pair and the tbf shaping belong to the shell script; this file only runs
``ip netns exec <ns>`` (it needs root because of that, nothing else).

Layout of ``--out``: ``<link>/<mode>/r<round>/`` is one run's sample dir (run.json, logs).

Invariants:
- every mode of a link runs the SAME job (model, weights, batch, steps, seed; only the EP flags
  differ), in the order m1 m2 ... mK m1 m2 ... (round-robin), so slow drift of the machine's load
  spreads over all modes;
- bounded: a run that exceeds RUN_TIMEOUT_S is killed (both ranks' process groups) and ends the
  link as failed; a round is started only if the budget left covers the previous round's duration
  (the first round always runs), so every mode has the same number of runs;
- nothing is timed here: the numbers are ``sampling_seconds`` and ``phase_seconds`` of run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASYNC = ["--ep", "--ep-async"]
DICE = ASYNC + ["--ep-async-pipeline", "--ep-async-mode", "shallow", "--ep-async-noskip-step", "2",
                "--ep-async-skip-strategy", "low"]
MODES = {
    "sync": ["--ep"],
    "displaced": ASYNC + ["--ep-async-mode", "all"],
    "interweaved": ASYNC + ["--ep-async-pipeline", "--ep-async-mode", "all"],
    "dice": DICE,
    "dice-bf16": DICE + ["--a2a-dtype", "bf16"],
}
PHASES = ("preprocess", "dispatch", "combine", "wait", "experts")
ADDR = {"A": "10.200.0.1", "B": "10.200.0.2"}


def _env(key: str, default: str) -> str:
    return os.environ.get(key) or default


def common_args(extra: list[str]) -> list[str]:
    """The job every mode runs (sizes from the environment, see bench_slow_link.sh)."""
    batch = int(_env("BATCH", "2"))
    return ["--model", _env("MODEL", "DiT-S/2"), "--image-size", _env("IMAGE_SIZE", "128"),
            "--device", "cpu", "--init", "random", "--vae", "none", "--sampler", "rf",
            "--num-sampling-steps", _env("STEPS", "10"), "--per-proc-batch-size", str(batch),
            "--num-fid-samples", str(2 * batch), "--cfg-scale", "1.5", "--global-seed", "0",
            *extra]


def rank_command(link: str, rank: int, ns: dict, port: int, argv: list[str]) -> tuple[list, dict]:
    """``ip netns exec`` command line and environment of one rank."""
    shaped = link != "loopback"
    where = ns["B"] if shaped and rank == 1 else ns["A"]
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE="2", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               MASTER_ADDR=ADDR["A"] if shaped else "127.0.0.1",
               GLOO_SOCKET_IFNAME=("vethB" if rank else "vethA") if shaped else "lo")
    return ["ip", "netns", "exec", where, sys.executable, "-m", "dice_ds.sample", *argv], env


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # each rank leads its own session (start_new_session)
    for p in procs:
        p.wait()


def run_once(link: str, ns: dict, port: int, argv: list[str], run_dir: Path, timeout: float) -> dict:
    """One 2-rank run; returns rank 0's run.json content plus the driver's notes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = argv + ["--sample-dir", str(run_dir / "samples")]
    procs = []
    try:
        for rank in (0, 1):
            cmd, env = rank_command(link, rank, ns, port, argv)
            with open(run_dir / f"rank{rank}.log", "w") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        load = os.getloadavg()[0]
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:  # timeout, a failed rank, Ctrl-C or SIGTERM: no rank outlives its run
        _kill(procs)
    codes = [p.returncode for p in procs]
    info_path = run_dir / "samples" / "run.json"
    if codes != [0, 0] or not info_path.exists():
        why = "timeout" if time.monotonic() > deadline else f"exit codes {codes}"
        return {"ok": False, "why": why, "load": load}
    info = json.loads(info_path.read_text())
    return {"ok": True, "load": load, "sampling_seconds": info["sampling_seconds"],
            "phase_seconds": info.get("phase_seconds", {}),
            "a2a_bytes_sent_remote": info.get("a2a_bytes_sent_remote", 0)}


def run_link(args, extra: list[str]) -> int:
    """Every mode, ``REPS`` rounds, round-robin, on the link the shell script has set up."""
    modes = _env("MODES", " ".join(MODES)).split()
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"MODES: unknown mode(s) {bad}; choose from {list(MODES)}", file=sys.stderr)
        return 2
    ns = {"A": args.ns_a, "B": args.ns_b}
    reps, per_run = int(_env("REPS", "3")), float(_env("RUN_TIMEOUT_S", "240"))
    end = time.monotonic() + args.budget_s
    link_dir = Path(args.out) / args.link
    results, port, last_round = [], 29600, 0.0
    for rnd in range(reps):
        left = end - time.monotonic()
        if rnd and left < last_round:  # a round that would not fit is not started
            print(f"[{args.link}] {left:.0f} s of budget left < last round's {last_round:.0f} s: "
                  f"stopping after {rnd} round(s)", file=sys.stderr)
            break
        t0 = time.monotonic()
        for mode in modes:
            port += 1
            res = run_once(args.link, ns, port, common_args(extra) + MODES[mode],
                           link_dir / mode / f"r{rnd}", per_run)
            res.update(link=args.link, mode=mode, round=rnd, job=" ".join(common_args(extra)))
            results.append(res)
            note = f"{res['sampling_seconds']:.2f} s" if res["ok"] else f"FAILED ({res['why']})"
            print(f"[{args.link}] round {rnd} {mode:12} {note}  (load {res['load']:.1f})",
                  file=sys.stderr, flush=True)
            if not res["ok"]:
                print(f"  logs: {link_dir / mode / f'r{rnd}'}", file=sys.stderr)
                return _save(link_dir, results) or 1
        last_round = time.monotonic() - t0
    return _save(link_dir, results)


def _save(link_dir: Path, results: list[dict]) -> int:
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def link_table(results: list[dict]) -> list[str]:
    """Markdown rows of one link: median seconds, speed-up over sync EP, median phases."""
    ok = [r for r in results if r["ok"]]
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    med = {m: _median([r["sampling_seconds"] for r in ok if r["mode"] == m]) for m in modes}
    base = med.get("sync")
    rows = ["| mode | runs | sampling s (median) | min-max | speed-up vs sync | "
            + " | ".join(f"{p} s" for p in PHASES) + " | remote MB/rank |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(PHASES) + "---:|"]
    for m in modes:
        mine = [r for r in ok if r["mode"] == m]
        secs = [r["sampling_seconds"] for r in mine]
        ph = [_median([r["phase_seconds"].get(p, 0.0) for r in mine]) for p in PHASES]
        mb = _median([r["a2a_bytes_sent_remote"] for r in mine]) / 1e6
        up = f"{base / med[m]:.2f}x" if base else "-"
        rows.append(f"| {m} | {len(mine)} | {med[m]:.2f} | {min(secs):.2f}-{max(secs):.2f} | {up} | "
                    + " | ".join(f"{v:.2f}" for v in ph) + f" | {mb:.1f} |")
    return rows


def report(args) -> int:
    out = Path(args.out)
    links = sorted((p for p in out.iterdir() if (p / "results.json").exists()),
                   key=lambda p: p.stat().st_mtime)
    if not links:
        print("no results", file=sys.stderr)
        return 1
    job = json.loads((links[0] / "results.json").read_text())[0].get("job", "?")
    rev = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "?"
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, commit {rev}, {os.cpu_count()} CPU cores; "
          f"job: {job}  (2 ranks, OMP_NUM_THREADS=1)")
    print("phases: rank 0, summed over the run, median over rounds; preprocess holds sync calls' "
          "blocking count exchange, dispatch/combine their all-to-all; wait = blocked on stale "
          "exchanges; speed-up = median sync / median mode")
    for link in links:
        results = json.loads((link / "results.json").read_text())
        loads = [r["load"] for r in results]
        failed = sum(not r["ok"] for r in results)
        print(f"\n### {link.name}" + (f" (tbf both ends, burst 256kb latency 100ms)"
                                      if link.name != "loopback" else " (inside namespace A)")
              + f" - load average {min(loads):.1f}-{max(loads):.1f}"
              + (f", {failed} failed run(s)" if failed else ""))
        print("\n".join(link_table(results)))
    return 0


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_once's cleanup


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["run", "report"])
    p.add_argument("--ns-a", required=True)
    p.add_argument("--ns-b", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--link", help="'loopback' or the tbf rate the script has set (run)")
    p.add_argument("--budget-s", type=float, default=420.0)
    args = p.parse_args(argv)
    if args.what == "run":
        if not args.link:
            p.error("run needs --link")
        return run_link(args, extra)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
