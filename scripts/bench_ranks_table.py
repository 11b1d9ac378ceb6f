"""The N-rank summary of docs/benchmarks.md from ``dice-ds bench --ranks N`` outputs.

Owns nothing but rendering: reads each given bench.json (one invocation per N) and prints one
markdown table per invocation (every mode and link: time, speed-up over sync EP, the overlap bound,
the CPU-aware bound and the % of each reached, what is left between the mode and the CPU-aware
bound, PSNR vs sync EP), then the targets of issue 16 (interweaved >= 1.3x over sync EP and >= 90 %
of the CPU-aware bound at N >= 4 on 100 mbit, displaced >= 90 % of it; the two 90 % targets at
N = 2 on 300 mbit) as met / missed with the measured value.

    python scripts/bench_ranks_table.py /work/bench16/n2/bench.json /work/bench16/n4/bench.json ...
"""

from __future__ import annotations

import json
import math
import sys


def _f(x, fmt="{:.2f}"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "exact"
    return fmt.format(x)


def _pct(x):
    return _f(x and 100 * x, "{:.0f} %")


def table(bench: dict) -> list[str]:
    meta = bench["meta"]
    n = meta.get("ranks", 2)
    out = [f"**{n} ranks** (`{meta['command']}`; {meta['date']}, commit {meta['commit']}, "
           f"load average {meta['load_min']:.1f}-{meta['load_max']:.1f}, "
           f"{meta['wall_seconds'] / 60:.0f} min wall)", ""]
    for link, probe in meta["probes"].items():
        if probe.get("ok"):
            out.append(f"- {link}: probe {probe['throughput_bits'] / 1e6:.0f} Mbit/s pipelined, "
                       f"{probe['lone_throughput_bits'] / 1e6:.0f} lone per rank and direction; "
                       f"exchanges cost {probe['cpu_per_byte'] * 1e9:.1f} ns machine CPU per byte "
                       "sent")
    out += ["", "| link | mode | s | speed-up | bound | % of bound | CPU bound | % of CPU bound "
            "| left s | waits s | blocking s | extra CPU s | rest s | PSNR dB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bench["rows"]:
        if not r.get("runs"):
            out.append(f"| {r['link']} | {r['mode']} | failed |" + " |" * 11)
            continue
        g = r.get("gap") or {}
        out.append(f"| {r['link']} | {r['mode']} | {r['seconds']:.2f} | "
                   f"{_f(r['speedup'], '{:.2f}x')} | {_f(r['bound'], '{:.2f}x')} | "
                   f"{_pct(r['pct_of_bound'])} | {_f(r.get('cpu_bound'), '{:.2f}x')} | "
                   f"{_pct(r.get('pct_of_cpu_bound'))} | {_f(g.get('seconds'))} | "
                   f"{_f(g.get('waits'))} | {_f(g.get('blocking'))} | {_f(g.get('extra_cpu'))} | "
                   f"{_f(g.get('rest'))} | {_f(r.get('psnr_vs_sync'), '{:.1f}')} |")
    return out + [""]


def targets(benches: list[dict]) -> list[str]:
    out = ["| N | link | target | measured | met |", "|---:|---|---|---:|---|"]
    for b in benches:
        n = b["meta"].get("ranks", 2)
        link = "300mbit" if n == 2 else "100mbit"
        rows = {r["mode"]: r for r in b["rows"] if r["link"] == link and r.get("runs")}
        checks = [("displaced >= 90 % of the CPU-aware bound", rows.get("displaced"),
                   "pct_of_cpu_bound", 0.9),
                  ("interweaved >= 90 % of the CPU-aware bound", rows.get("interweaved"),
                   "pct_of_cpu_bound", 0.9)]
        if n >= 4:
            checks.insert(0, ("interweaved >= 1.3x over sync EP", rows.get("interweaved"),
                              "speedup", 1.3))
        for name, row, key, want in checks:
            val = row.get(key) if row else None
            shown = (_f(val, "{:.2f}x") if key == "speedup" else _pct(val))
            out.append(f"| {n} | {link} | {name} | {shown} | "
                       f"{'yes' if val is not None and val >= want else 'no'} |")
    return out


def main(paths: list[str]) -> int:
    benches = [json.load(open(p)) for p in paths]
    lines = []
    for b in benches:
        lines += table(b)
    lines += targets(benches)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
