"""Run one N-rank job of ``dice-ds bench`` on a link: a sampling run or the communication probe.

Owns starting the ranks (N = ``Links.ranks``; each the leader of its own session, so a timeout, a
failed rank, Ctrl-C or SIGTERM kills every rank's whole process group), the per-run timeout, and
reading back what the job wrote.
Nothing is timed here: sampling runs report their own ``sampling_seconds`` (run.json), the probe its
own seconds; a run's record adds the machine's CPU outside its ranks (the report's check that the
bound was measured on a quiet machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dice_ds.bench.links import Links
from dice_ds.bench.probe import cpu_marks, foreign_cpu

SAMPLES = "samples"
"""A sampling run's sample directory inside its run directory (its settings name it)."""

FAILED_RANK_GRACE_S = 5.0
"""Seconds the other ranks get to end on their own after one failed, before they are killed."""


def kill_sessions(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process's whole session (started with ``start_new_session``) and reap it."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def run_ranks(links: Links, link: str, port: int, module_argv: list[str], run_dir: Path,
              timeout_s: float) -> tuple[bool, str]:
    """Every rank of ``python -m <module_argv>``; (ok, why) with logs in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout_s
    try:
        for rank in range(links.ranks):
            prefix, env = links.rank_env(link, rank, port)
            with open(run_dir / f"rank{rank}.log", "w") as log:
                procs.append(subprocess.Popen([*prefix, sys.executable, "-m", *module_argv],
                                              env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                return False, f"timeout after {timeout_s:.0f} s"
            if any(p.poll() not in (None, 0) for p in procs):
                # the others usually end on their own within seconds, rank 0 with the one-line
                # error the job prints (a configuration error is printed by rank 0 only)
                grace = time.monotonic() + FAILED_RANK_GRACE_S
                while any(p.poll() is None for p in procs) and time.monotonic() < grace:
                    time.sleep(0.1)
                break
            time.sleep(0.1)
    finally:
        kill_sessions(procs)
    codes = [p.returncode for p in procs]
    return all(c == 0 for c in codes), f"exit codes {codes}"


def sample_run(links: Links, link: str, port: int, argv: list[str], run_dir: Path,
               timeout_s: float) -> dict:
    """One sampling run of ``dice_ds.sample argv`` (``--config`` a settings file whose sample
    directory is ``run_dir/SAMPLES``); returns the bench's record of it (``ok`` False with ``why``
    on failure; ``cpu``: ``dice_ds.bench.probe.foreign_cpu`` over the run)."""
    sample_dir = run_dir / SAMPLES
    marks = cpu_marks()
    ok, why = run_ranks(links, link, port, ["dice_ds.sample", *argv], run_dir, timeout_s)
    info_path = sample_dir / "run.json"
    if not ok or not info_path.exists():
        return {"ok": False, "why": why, "logs": str(run_dir)}
    return dict(record_of(json.loads(info_path.read_text()), sample_dir), cpu=foreign_cpu(marks))


def sync_fraction(runtime: dict) -> float | None:
    """Share of (step, MoE layer) calls that run a fresh exchange (1: all; None: not EP or SP)."""
    sch = runtime.get("schedule")
    if not sch:
        return None
    steps, depth = sch["num_steps"], sch["depth"]
    if sch.get("sp_async"):
        return len(sch["sp_sync_steps"]) / steps
    stale = (steps - len(sch["ep_sync_steps"])) * len(sch["async_layers"])
    return 1.0 - stale / (steps * depth)


def record_of(info: dict, sample_dir: Path) -> dict:
    """The bench's record of one finished run, from its run.json."""
    ranks = [r.get("runtime") or {} for r in info.get("per_rank", [])]
    return {
        "ok": True, "sampling_seconds": info["sampling_seconds"],
        # each rank's CPU seconds (all its threads) over the sampling loops
        "cpu_seconds": [sum(r.get("batch_cpu_seconds") or [0.0]) for r in info.get("per_rank", [])],
        "phase_seconds": [r.get("phase_seconds", {}) for r in ranks],
        # EP all-to-all bytes to other ranks + SP all-gather bytes (K/V and the final x)
        "bytes_remote": [(r.get("a2a_bytes_sent_remote") or 0) + (r.get("sp_bytes_exchanged") or 0)
                         for r in ranks],
        "bytes_sent": [r.get("a2a_bytes_sent", 0) for r in ranks],
        "exchanges": [sum(len(k) for layers in (r.get("a2a_rows_by_step") or {}).values()
                          for k in layers.values()) for r in ranks],
        # stale EP exchanges held across steps + displaced SP's K/V buffers
        "cache_peak_bytes": [(r.get("ep_cache_peak_bytes") or 0) + (r.get("sp_kv_buffer_bytes") or 0)
                             for r in ranks],
        "sp_stats": [{k: v for k, v in r.items() if k.startswith("sp_")} for r in ranks],
        "latents": str(sample_dir / "latents.npz"),
        "sync_fraction": sync_fraction(ranks[0]) if ranks else None,
        "expert_balance": expert_balance_of(info.get("expert_placement")),
    }


def expert_balance_of(record: dict | None) -> dict | None:
    """A run.json's ``expert_placement`` without its tables: the busiest EP rank's rows over the
    mean (worst, median layer) and the placement's name (its source for a computed one)."""
    if not record or record.get("imbalance_max") is None:
        return None
    placement = record.get("placement")
    name = placement if isinstance(placement, str) else (
        f"{placement.get('slots_per_rank')} slots/rank ({placement.get('source') or 'file'})")
    return {"imbalance_max": record["imbalance_max"],
            "imbalance_median": record["imbalance_median"], "placement": name}


def probe_run(links: Links, link: str, port: int, bytes_per_call: int, calls: int,
              run_dir: Path, timeout_s: float, gather_bytes: int = 0,
              lone_calls: int = 60) -> dict:
    """The communication-only probe (``dice_ds.bench.probe``) with the given exchange sizes:
    pipelined, lone, and (``gather_bytes`` > 0) lone all-gather."""
    out = run_dir / "probe.json"
    argv = ["dice_ds.bench.probe", "--bytes-per-call", str(bytes_per_call), "--calls", str(calls),
            "--lone-calls", str(lone_calls), "--out", str(out)]
    if gather_bytes:
        argv += ["--gather-bytes", str(gather_bytes)]
    ok, why = run_ranks(links, link, port, argv, run_dir, timeout_s)
    if not ok or not out.exists():
        return {"ok": False, "why": why, "logs": str(run_dir)}
    return {"ok": True, **json.loads(out.read_text())}
