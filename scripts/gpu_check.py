"""The GPU check's driver (run it through ``scripts/gpu_check.sh``; docs/gpu_check.md).

Owns the sizes of each step on a GPU and in the CPU rehearsal (``--dry-run``/``--tiny``), the time
budget (each step runs in its own process, ``scripts/gpu_check_steps.py``, killed when its share of
the budget is spent; a failed or timed-out step is recorded and the next one runs), and the two
outputs: ``gpu_check.json`` (machine, installed wheels, every step's status, reason, seconds and
results) and ``gpu_check.md`` (one table), plus ``gpu_check.log`` (the steps' output).

    python scripts/gpu_check.py [--dry-run] [--out DIR] [--budget S] [--steps machine,ep_modes] [--quick]

Exit status: 0 when every step is ok or skipped with a reason, 1 otherwise.
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

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("machine", "ep_modes", "step_time", "tests")
"""In this order: the measurements first; pytest (whose XL/2 tests draw full-size weights on the
CPU) gets what is left of the budget."""
RESERVE = {"gpu": {"machine": 30, "ep_modes": 120, "step_time": 150, "tests": 150},
           "tiny": {"machine": 20, "ep_modes": 60, "step_time": 40, "tests": 40}}
"""Seconds kept for each later step when an earlier one starts (its timeout is what is left)."""
DEBUG_CASE = {"name": "debug fp32", "model": "debug", "dtype": "float32", "images": 2, "steps": 6,
              "std": 0.1, "dp_reference": True, "sync_tol": 1e-5, "stale_tol": 0.5}
"""The test suite's EP job (tests/multirank/test_ep_modes.py: weights N(0, 0.1), 2 images per rank,
6 Euler steps): sync EP must equal the single-process model to fp32 rounding; an async mode's
images must be finite and within 0.5 relative of sync EP (a sanity bound; the CPU values are in
the dry-run's JSON)."""
QUICK_MODES = ("displaced", "interweaved", "dice")


def ep_modes_all() -> list[str]:
    from dice_ds.modes import MESH_MODES, MODES

    return [m.key for m in MODES if m.settings.get("ep") and not m.settings.get("sp")
            and m.key not in MESH_MODES and m.key != "sync"]


def step_params(a) -> dict:
    """What each step runs: full sizes on a GPU, tiny ones in the CPU rehearsal."""
    tiny = a.dry_run or a.tiny
    modes = list(QUICK_MODES) if a.quick else ep_modes_all()
    cases = [DEBUG_CASE]
    if not a.quick:  # XL/2 width at 2 ranks: bf16 timing of every mode (no tolerance known)
        xl = {"name": "XL/2 width bf16", "model": "DiT-XL/2", "dtype": "bfloat16", "steps": 6,
              "std": 0.02, "stale_tol": 1.0}
        cases.append({**xl, "images": 1, "replace": {"depth": 2, "input_size": 8}} if tiny else
                     {**xl, "images": 8, "replace": {"depth": 2}})
    if tiny:
        step = ({"model": "debug", "batch": 2, "warmup": 1, "rounds": 2} if a.quick else
                {"model": "DiT-XL/2", "replace": {"depth": a.depth or 1, "input_size": 8},
                 "batch": a.batch or 1, "warmup": 1, "rounds": 3})
    else:
        step = {"model": "DiT-XL/2", "batch": a.batch or 32, "warmup": 3, "rounds": 10}
        if a.depth:
            step["replace"] = {"depth": a.depth}
    return {"machine": {},
            "tests": {"paths": ["tests/gpu"]},
            "ep_modes": {"modes": modes, "cases": cases, "transport": a.ep_transport},
            "step_time": step}


def run_step(name: str, params: dict, timeout: float, env: dict, log) -> dict:
    """One step in its own process group; killed (the whole group) after ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        pfile, rfile = Path(tmp) / "params.json", Path(tmp) / "result.json"
        pfile.write_text(json.dumps({**params, "timeout": max(timeout - 15, 10)}))
        log.write(f"\n===== step {name} (timeout {timeout:.0f} s) =====\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_check_steps.py"),
                                 name, str(pfile), str(rfile)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and its ranks (its own session)
            proc.wait()
            return {"status": "timeout", "reason": f"still running after {timeout:.0f} s "
                    "(killed)", "seconds": time.perf_counter() - t0, "results": {}}
        seconds = time.perf_counter() - t0
        if not rfile.exists():
            return {"status": "failed", "reason": f"step process exited {code} without a result "
                    "(gpu_check.log has its output)", "seconds": seconds, "results": {}}
        out = json.loads(rfile.read_text())
        out["seconds"] = seconds
        return out


# ----------------------------------------------------------------------------- report
def _gib(x) -> str:
    return "–" if x is None else f"{x / 2**30:.2f} GiB"


def table(report: dict) -> str:
    rows = []
    for name in STEPS:
        st = report["steps"].get(name)
        if st is None:
            continue
        r = st.get("results", {})
        summary = st["reason"]
        if name == "machine" and st["status"] == "ok":
            summary = (f"Python {r['python']}, torch {r['torch']} (CUDA {r['cuda_runtime']}), "
                       f"{r.get('gpu') or 'no GPU'}, megatron-core {r['megatron-core']}")
        elif name == "tests" and "passed" in r:
            summary = (f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
                       f"{r['skipped']} skipped" + (f" ({st['reason']})" if st["reason"] else ""))
        rows.append((name, "", st["status"], f"{st['seconds']:.1f}", summary))
        if name == "ep_modes" and r.get("cases"):
            rows.append(("ep_modes", "transport", "", "", r["transport"]))
            for case in r["cases"]:
                if "sync_vs_single_process_rel" in case:
                    rows.append(("ep_modes", f"{case['name']}: sync EP vs 1 process", "", "",
                                 f"rel {case['sync_vs_single_process_rel']:.1e}, bitwise "
                                 f"{case['sync_vs_single_process_bitwise']}"))
                for key, m in case["modes"].items():
                    rel = f", rel to sync {m['rel_to_sync']:.3g}" if "rel_to_sync" in m else ""
                    rows.append(("ep_modes", f"{case['name']}: {key}", "finite" if m["finite"]
                                 else "NOT FINITE", f"{m['seconds']:.2f}",
                                 f"{m['remote_bytes'] / 2**20:.2f} MiB sent remote{rel}"))
        if name == "step_time" and r.get("impls"):
            head = (f"{r['model']} depth {r['depth']}, {r['tokens_per_image']} tokens, batch "
                    f"{r['batch']} (CFG: {r['rows']} rows), bf16, {r['device']}")
            rows.append(("step_time", "job", "", "", head + (" — " + r["note"] if "note" in r
                                                           else "")))
            for impl, m in r["impls"].items():
                mem = (f"peak {_gib(m['peak_bytes'])} vs plan {_gib(m['plan_bytes'])} "
                       f"({m['peak_over_plan']:.2f}x)" if m["peak_bytes"] else m["memory_note"])
                rows.append(("step_time", f"{impl} experts", f"{m['step_seconds'] * 1e3:.1f} ms",
                             "", f"plan H100 (eff. 0.4) {m['plan_step_seconds_h100'] * 1e3:.3g} ms"
                             f" ({m['measured_over_plan']:.2f}x); {m['tflops']:.3g} TFLOP/s = "
                             f"efficiency {m['efficiency_to_match']:.3g} of 989 TFLOP/s; {mem}"))
            ea = r["experts_alone"]
            alone = ", ".join(f"{k[:-8]} {v * 1e3:.2f} ms" for k, v in ea.items()
                              if k.endswith("_seconds"))
            rows.append(("step_time", "experts alone (1 layer)", "", "",
                         f"{ea['rows']} rows: {alone}; Transformer Engine: "
                         f"{ea['transformer_engine']}"))
            rows.append(("step_time", "dice-ds plan", "", "",
                         f"`{r['plan']['command']}`: {r['plan'].get('cli_check', '')}"))
    lines = ["| step | item | status / value | seconds | result |", "|---|---|---|---:|---|"]
    lines += ["| " + " | ".join(" ".join(str(c).split()).replace("|", "/") for c in row) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU rehearsal with this environment: tiny sizes (no install)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (gpu_check.sh installs)")
    p.add_argument("--quick", action="store_true",
                   help="fewer modes, no XL/2-width EP case, debug model step (the unit test)")
    p.add_argument("--out", default=None, help="default: $OUT if set, else a new temporary folder")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all steps (default 450 on a GPU, 240 for --dry-run/--tiny)")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--depth", type=int, default=None, help="step_time: XL/2 depth (default 28)")
    p.add_argument("--batch", type=int, default=None, help="step_time: images (default 32)")
    p.add_argument("--ep-transport", default="auto", choices=("auto", "direct", "staged"),
                   help="ep_modes: gloo on device tensors, staged through CPU, or auto (probe)")
    p.add_argument("--wheels-report", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tiny = a.dry_run or a.tiny
    budget = a.budget or (240.0 if tiny else 450.0)
    out = Path(a.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if s in a.steps.split(",")]
    # no working-directory entry on sys.path (python -m pytest, the forkserver's python -c): the
    # repository's dice_ds/ lacks dice_ds.patches and must not shadow the installed one
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    if tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal runs on CPU even on a GPU machine
    env.setdefault("OMP_NUM_THREADS", "1" if tiny else str(max(1, (os.cpu_count() or 2) // 2)))
    params = step_params(a)
    reserve = RESERVE["tiny" if tiny else "gpu"]
    report = {"gpu_check": 1, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(["scripts/gpu_check.py", *(argv or sys.argv[1:])]),
              "dry_run": a.dry_run, "tiny": tiny, "quick": a.quick, "budget_s": budget,
              "wheels": (json.loads(Path(a.wheels_report).read_text())
                         if a.wheels_report and Path(a.wheels_report).exists() else None),
              "params": params, "steps": {}}
    t0 = time.perf_counter()
    with open(out / "gpu_check.log", "w") as log:
        for i, name in enumerate(steps):
            left = budget - (time.perf_counter() - t0)
            timeout = left - sum(reserve[s] for s in steps[i + 1:])
            if timeout < 10:
                report["steps"][name] = {"status": "timeout", "seconds": 0.0, "results": {},
                                         "reason": f"not started: {left:.0f} s of the budget left"}
                continue
            report["steps"][name] = run_step(name, params[name], timeout, env, log)
            st = report["steps"][name]
            print(f"gpu_check: {name}: {st['status']} in {st['seconds']:.1f} s"
                  + (f" ({st['reason'][:200]})" if st["reason"] else ""), file=sys.stderr)
    report["wall_s"] = time.perf_counter() - t0
    report["machine"] = report["steps"].get("machine", {}).get("results")
    bad = [n for n, st in report["steps"].items() if st["status"] not in ("ok", "skipped")]
    report["ok"] = not bad
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    md = table(report)
    head = ("# GPU check" + (" (CPU rehearsal: --dry-run)" if a.dry_run else " (tiny, CPU)"
                             if tiny else "") + f"\n\n{report['date']}, {report['wall_s']:.0f} s, "
            + ("every step ok or skipped" if not bad else f"NOT OK: {', '.join(bad)}") + "\n\n")
    (out / "gpu_check.md").write_text(head + md)
    print(head + md)
    print(f"gpu_check: {out}/gpu_check.json, gpu_check.md, gpu_check.log", file=sys.stderr)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
