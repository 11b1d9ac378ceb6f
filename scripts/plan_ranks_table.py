"""The N-rank validation table of docs/plan.md "Validation at 4 and 8 ranks", from the outputs of
``dice-ds plan --validate ... --calibration ...`` (strict: the 2-rank link) and the same with
``--link-from-bench`` (the N-rank probe's link), side by side, plus a one-line summary per
(N, link column) of the rows outside 15 %.

    python scripts/plan_ranks_table.py docs/plan_validation_n4 docs/plan_validation_n8
    # reads DIR/plan.json and DIR_nprobe/plan.json for each DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOLERANCE = 15.0


def _rows(path: Path) -> list[dict]:
    return [r for r in json.loads((path / "plan.json").read_text())["validation"]
            if "error" not in r]


def _pred(r: dict) -> tuple[float, float]:
    f = r.get("fitted") or r
    return f["predicted"], f["error_pct"]


def main(dirs: list[str]) -> int:
    out = ["| N | link | mode | measured s | predicted s (2-rank link) | error | "
           "predicted s (N-rank probe's link) | error |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    misses: dict[str, list[str]] = {}
    for d in map(Path, dirs):
        strict = _rows(d)
        probe_dir = d.with_name(d.name + "_nprobe")
        nprobe = {(r["link"], r["mode"]): r for r in _rows(probe_dir)} if probe_dir.is_dir() else {}
        for r in strict:
            n = r["ranks"]
            p, e = _pred(r)
            q = nprobe.get((r["link"], r["mode"]))
            qp, qe = _pred(q) if q else (None, None)
            mode = r["mode"] + (" (all DP runs pooled)" if r.get("measured_pooled") else "")
            out.append(f"| {n} | {r['link']} | {mode} | {r['measured']:.2f} | {p:.2f} | "
                       f"{e:+.0f} % | " + (f"{qp:.2f} | {qe:+.0f} % |" if q else "– | – |"))
            for col, err in (("2-rank link", e), ("N-rank probe's link", qe)):
                if err is not None and abs(err) > TOLERANCE:
                    misses.setdefault(f"N = {n}, {col}", []).append(
                        f"{r['link']} {r['mode']} {err:+.0f} %")
    print("\n".join(out))
    print()
    for key in sorted(misses):
        print(f"- outside {TOLERANCE:.0f} % ({key}): {', '.join(misses[key])}")
    if not misses:
        print(f"- every row within {TOLERANCE:.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["docs/plan_validation_n4", "docs/plan_validation_n8"]))
