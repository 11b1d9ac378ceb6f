"""The tuned-vs-fixed table and plot of docs/tune.md from committed files (no run).

Measured speed-up over sync EP per policy from a ``dice-ds bench`` JSON (one invocation, every
policy interleaved), quality from the ``--evidence`` rows of a ``dice-ds tune`` report (PSNR vs
sync EP and digits-FID over the same seeds), predictions from the same report. Policies are matched
by key (the bench's mode key / --mode-config name = the evidence row's key).

    python scripts/plot_tune_evidence.py --report docs/tune_report.json \
        --bench docs/bench_digits_v2.json --link 300mbit --png docs/tune_evidence.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(report: dict, bench: dict, link: str) -> list[dict]:
    speed = {r["mode"]: r for r in bench["rows"] if r["link"] == link}
    out = []
    for e in report["evidence"]:
        b = speed.get(e["key"], {})
        out.append({"key": e["key"], "policy": e["policy"], "flags": e["flags"],
                    "speedup": b.get("speedup"), "seconds": b.get("seconds"),
                    "range": (b.get("min"), b.get("max")), "psnr": e.get("psnr_db"),
                    "fid": e.get("digits_fid"), "acc": e.get("class_accuracy"),
                    "speedup_pred": e.get("speedup_pred"), "psnr_pred": e.get("psnr_pred")})
    return out


def table(data: list[dict]) -> str:
    lines = ["| policy | measured s (min-max) | measured speed-up | predicted | PSNR vs sync (dB) "
             "| predicted PSNR | digits-FID | class acc. |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data:
        lo, hi = r["range"]
        psnr = "–" if r["psnr"] in (None, float("inf")) else f"{r['psnr']:.2f}"
        pp = "–" if r["psnr_pred"] in (None, float("inf")) else f"{r['psnr_pred']:.1f}"
        lines.append(
            f"| {r['policy']} | {r['seconds']:.2f} ({lo:.2f}-{hi:.2f}) | {r['speedup']:.2f}x | "
            f"{(r['speedup_pred'] or 1.0):.2f}x | {psnr} | {pp} | {r['fid']:.2f} | "
            f"{100 * r['acc']:.0f} % |")
    return "\n".join(lines)


def plot(data: list[dict], png: str, link: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in data:
        if r["psnr"] in (None, float("inf")) or r["speedup"] is None:
            continue
        star = r["key"] == "tuned"
        ax.scatter(r["speedup"], r["psnr"], s=90 if star else 40,
                   marker="*" if star else "o", color="C3" if star else "C0")
        ax.annotate(r["policy"], (r["speedup"], r["psnr"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"measured speed-up over sync EP ({link}, 2 ranks)")
    ax.set_ylabel("PSNR vs sync EP, same seeds (dB)")
    ax.set_title("digits model: tuned policy vs fixed policies")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", default="docs/tune_report.json")
    p.add_argument("--bench", default="docs/bench_digits_v2.json")
    p.add_argument("--link", default="300mbit")
    p.add_argument("--png", default=None)
    a = p.parse_args()
    data = rows(json.loads(Path(a.report).read_text()), json.loads(Path(a.bench).read_text()),
                a.link)
    print(table(data))
    if a.png:
        plot(data, a.png, a.link)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
