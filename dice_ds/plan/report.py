"""Tables and the plot of ``dice-ds plan``: markdown, JSON and a PNG.

Owns rendering the GPU scenario predictions (per model, GPU count and device/link: step time,
speed-up over sync EP, exposed-communication share, per-GPU stale cache and K/V), the two-level
fabric's rank layouts (``layouts_table``, ``picks``), the validation
table (predicted vs measured per link and mode) and the plot (speed-up per mode per scenario; and
predicted vs measured seconds when a validation ran).
"""

from __future__ import annotations

import json
from pathlib import Path

from dice_ds.bench.report import no_matplotlib

MIB = 2**20


def _mib(x: float) -> str:
    return f"{x / MIB:,.0f}" if x >= MIB else (f"{x / MIB:.2f}" if x else "0")


def _speedup(r: dict) -> str:
    """The row's speed-up over sync EP, '–' when sync EP was not predicted (e.g. --modes dp)."""
    return "–" if r.get("speedup") is None else f"{r['speedup']:.2f}x"


def scenario_table(rows: list[dict]) -> str:
    out = ["| model | GPUs | device / link | mode | EP x SP | step ms | speed-up vs sync EP | "
           "exposed comm | expert weights MiB/GPU | dense weights MiB/GPU | activations MiB/GPU | "
           "stale cache MiB/GPU | skip cache MiB/GPU | K/V cache MiB/GPU | total MiB/GPU | "
           "fits device memory |",
           "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        m = r["memory"]
        out.append(f"| {r['model']} | {r['gpus']} | {r['scenario']} | {r['mode']} | "
                   f"{r['ep']} x {r['sp']} | {1e3 * r['step_seconds']:.1f} | "
                   f"{_speedup(r)} | {100 * r['comm_share']:.0f} % | "
                   f"{_mib(m['expert_weights'])} | {_mib(m['dense_weights'])} | "
                   f"{_mib(m['activations'])} | {_mib(m['stale_cache'])} | "
                   f"{_mib(m['skip_cache'])} | {_mib(m['kv_cache'])} | {_mib(sum(m.values()))} | "
                   f"{ {True: 'yes', False: 'NO', None: '–'}[r.get('fits_memory')]} |")
    return "\n".join(out)


def summary_table(rows: list[dict]) -> str:
    """One line per (model, GPUs, scenario): sync EP step time and every mode's speed-up."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    out = ["| model | GPUs | device / link | sync EP step ms | sync EP exposed comm | "
           + " | ".join(modes) + " |", "|---|---:|---|---:|---:|" + "---:|" * len(modes)]
    for key in dict.fromkeys((r["model"], r["gpus"], r["scenario"]) for r in rows):
        mine = {r["mode"]: r for r in rows if (r["model"], r["gpus"], r["scenario"]) == key}
        sync = mine.get("sync")
        cells = [_speedup(mine[m]) if m in mine else "–" for m in modes]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                   + (f"{1e3 * sync['step_seconds']:.0f} | {100 * sync['comm_share']:.0f} % | "
                      if sync else "– | – | ") + " | ".join(cells) + " |")
    return "\n".join(out)


def validation_table(rows: list[dict]) -> str:
    fit = any("fitted" in r for r in rows)
    head = ("| link | mode | measured s | predicted s (probe) | error | "
            + ("predicted s (+ fitted emulation) | error | " if fit else "")
            + "speed-up measured | speed-up predicted | predicted exposed comm | "
            "remote MB/rank meas. / pred. | stale cache KB meas. / pred. |")
    out = [head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['link']} | {r['mode']} | – | {r['error']} |")
            continue
        cal = (" (calibration)" if r["calibration"] else
               " (all DP runs pooled)" if r.get("measured_pooled") else "")
        if "layout" in r:  # a --nodes bench row: its rank layout, the plan's pick, the faster
            cal += f" [{r['layout']}" + (", plan picks" if r.get("picked") else "") + (
                ", measured faster" if r.get("measured_faster") else "") + "]"
        sm = r["speedup_measured"]
        f = r.get("fitted")
        fit_cols = ((f"{f['predicted']:.2f} | {f['error_pct']:+.0f} % | " if f else "– | – | ")
                    if fit else "")
        sp = f["speedup_predicted"] if f else r["speedup_predicted"]
        out.append(
            f"| {r['link']} | {r['mode']}{cal} | {r['measured']:.2f} | {r['predicted']:.2f} | "
            f"{r['error_pct']:+.0f} % | {fit_cols}{f'{sm:.2f}x' if sm else '–'} | "
            f"{sp:.2f}x | {100 * (f or r)['comm_share']:.0f} % | "
            f"{r['bytes_measured'] / 1e6:.1f} / {r['bytes_predicted'] / 1e6:.1f} | "
            f"{(r['cache_measured'] or 0) / 1e3:.0f} / {r['cache_predicted'] / 1e3:.0f} |")
    out += layout_agreement(rows)
    emu = next((r["emulation"] for r in rows if "emulation" in r), None)
    if emu:
        out += ["", f"Emulation constant fitted on {emu['fitted_on']} (least squares; there "
                f"rms error {emu['rms_error_pct']:.1f} %, max {emu['max_abs_error_pct']:.0f} %): "
                "the network path takes "
                f"{1e9 * emu['cpu_per_byte']:.1f} ns of a rank's compute per byte it sends or "
                "receives (shaped links only). Speed-up and exposed comm columns use it."]
    return "\n".join(out)


def layouts_table(rows: list[dict]) -> str:
    """Two-level fabric: every mode in each rank layout, which groups cross nodes, the pick."""
    out = ["| model | nodes x ranks | device | intra / inter link | mode | EP x SP | layout | "
           "groups crossing nodes | step ms | exposed comm | vs picked | picked |",
           "|---|---|---|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        cross = ", ".join(f"{k} {n}" for k, n in r["crossing_nodes"].items() if n) or "none"
        out.append(f"| {r['model']} | {r['nodes']} x {r['ranks_per_node']} | {r['device']} | "
                   f"{r['intra']} / {r['inter']} | {r['mode']} | {r['ep']} x {r['sp']} | "
                   f"{r['layout']} ({r['arrangement']}) | {cross} | "
                   f"{1e3 * r['step_seconds']:.1f} | {100 * r['comm_share']:.0f} % | "
                   f"{r['vs_picked']:.2f}x | {'**yes**' if r['picked'] else ''} |")
    return "\n".join(out)


def picks(rows: list[dict]) -> list[str]:
    """One line per (model, world, mode) with two layouts: which one the plan picks and by how
    much."""
    out = []
    for key in dict.fromkeys((r["model"], r["gpus"], r["device"], r["mode"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["gpus"], r["device"], r["mode"]) == key]
        if len(mine) < 2:
            continue
        best = next(r for r in mine if r["picked"])
        other = max(mine, key=lambda r: r["vs_picked"])
        out.append(f"{key[0]}, {best['nodes']} x {best['ranks_per_node']} ranks, {key[3]}: picks "
                   f"{best['layout']} ({best['arrangement']}), {other['layout']} predicted "
                   f"{other['vs_picked']:.2f}x slower")
    return out


def layout_agreement(rows: list[dict]) -> list[str]:
    """A --nodes bench's validation: per (rate, mode) run in both arrangements, the plan's pick
    against the arrangement that measured faster."""
    out = []
    for key in dict.fromkeys((r["rate"], r["mode"]) for r in rows if "picked" in r):
        both = [r for r in rows if (r.get("rate"), r["mode"]) == key and "picked" in r]
        pick = next(r for r in both if r["picked"])
        fast = next(r for r in both if r["measured_faster"])
        other = next(r for r in both if r is not pick)
        out.append(f"- {key[0]}, {key[1]}: plan picks {pick['layout']} ({pick['arrangement']}; "
                   f"predicted {other['predicted'] / pick['predicted']:.2f}x faster than "
                   f"{other['layout']}); measured faster: {fast['layout']} "
                   f"({other['measured'] / pick['measured']:.2f}x) - "
                   + ("agrees" if pick is fast else "DISAGREES"))
    return [""] + out if out else []


def plot(scen: list[dict], val: list[dict] | None, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return no_matplotlib(path.name)
    groups = list(dict.fromkeys((r["model"], r["gpus"], r["scenario"]) for r in scen))
    modes = list(dict.fromkeys(r["mode"] for r in scen))
    ncol = (1 if scen else 0) + (1 if val else 0)
    if not ncol:
        return "nothing to plot"
    fig, axes = plt.subplots(1, ncol, figsize=(7 * ncol, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(groups))
    for gi, g in enumerate(groups):
        ys = [next((r["speedup"] or 0 for r in scen if (r["model"], r["gpus"], r["scenario"]) == g
                    and r["mode"] == m), 0) for m in modes]
        ax.bar([x + gi * width for x in range(len(modes))], ys, width,
               label=f"{g[0]} {g[1]} GPUs {g[2]}")
    if scen:
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(modes))], modes, rotation=45,
                      fontsize=7)
        ax.set_ylabel("predicted speed-up over sync EP")
        ax.legend(fontsize=5)
    if val:
        ax = axes[0][-1]
        pts = [r for r in val if "error" not in r]
        for link in dict.fromkeys(r["link"] for r in pts):
            mine = [r for r in pts if r["link"] == link]
            ys = [(r.get("fitted") or r)["predicted"] for r in mine]
            ax.scatter([r["measured"] for r in mine], ys, label=link)
            for r, y in zip(mine, ys):
                ax.annotate(r["mode"], (r["measured"], y), fontsize=6)
        hi = max([r["measured"] for r in pts] + [(r.get("fitted") or r)["predicted"]
                                                  for r in pts] + [1])
        ax.plot([0, hi], [0, hi], color="grey", lw=0.5)
        ax.plot([0, hi], [0, 1.15 * hi], color="grey", lw=0.3, ls="--")
        ax.plot([0, hi], [0, 0.85 * hi], color="grey", lw=0.3, ls="--")
        ax.set_xlabel("measured s (dice-ds bench)")
        ax.set_ylabel("predicted s (dice-ds plan" + (", fitted emulation)" if any(
            "fitted" in r for r in pts) else ")"))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(out: Path, scen: list[dict], val: list[dict] | None, meta: dict,
          layouts: list[dict] | None = None) -> dict:
    """plan.md, plan.json and plan.png in ``out``; {markdown, plot (path or None), plot_why}.
    ``layouts``: the two-level fabric's rows (``dice_ds.plan.fabric.predict_layouts``)."""
    out.mkdir(parents=True, exist_ok=True)
    md = [f"`{meta['command']}`", ""]
    if layouts:
        md += ["### Rank layouts on the two-level fabric", "", layouts_table(layouts), "",
               *[f"- {line}" for line in picks(layouts)], ""]
    if scen:
        md += ["### Summary (speed-up over sync EP)", "", summary_table(scen), "",
               "### Predictions", "", scenario_table(scen), ""]
    if meta.get("paper"):
        md += [meta["paper"], ""]
    if val:
        md += ["### Validation against dice-ds bench", "", validation_table(val), ""]
    if meta.get("calibration_notes"):
        md += ["### Calibration", "", *[f"- {line}" for line in meta["calibration_notes"]], ""]
    text = "\n".join(md)
    (out / "plan.md").write_text(text + "\n")
    (out / "plan.json").write_text(json.dumps({"meta": meta, "predictions": scen,
                                               "validation": val, "layouts": layouts},
                                              indent=1, default=str))
    why = plot(scen, val, out / "plan.png")
    return {"markdown": text, "plot": None if why else str(out / "plan.png"), "plot_why": why}
