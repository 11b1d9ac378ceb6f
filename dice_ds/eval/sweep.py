"""``dice-ds eval --sweep``: the quality table of the shipped digits model across parallel modes.

Owns the quality table's mode list (``MODES``, rows of ``dice_ds.modes``), launching one
``torchrun --standalone --nproc_per_node W -m dice_ds.sample --config settings.json`` per mode with
the same seeds, evaluating each run with ``dice_ds.eval.metrics`` (digits-FID, class accuracy,
PSNR/MSE against the sync-EP run of the same seeds), and writing the table as markdown and JSON
together with the exact command.

Settings travel as a tree, as in ``dice-ds bench`` (dice_ds/bench/cli.py): each run's settings are
the sweep's job with the mode's settings over it (``run_settings``), written to the run directory's
``settings.json`` (``dice_ds.ds_config.write_config``) that the sampler reads with ``--config``;
no flag string is built for the sampler. The table's ``flags`` column is ``Mode.flags``, for display.

Invariants: every mode samples the same global indices (same ``global_seed``), so PSNR against sync
EP measures only the deviation that the mode introduces; a mode whose settings the sampler rejects
(the tree's checks and the sampler's own cross-field rules, run in-process first) is listed as not
available, never dropped silently; each run directory carries a stamp of its rank count and its
settings tree: a complete run with the same stamp is reused, an interrupted one resumes, one made
with other settings is deleted and redone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dice_ds.config import ConfigError
from dice_ds.data import real_digits_uint8
from dice_ds.ds_config import Settings, to_json, write_config
from dice_ds.eval.metrics import (
    SampleSet,
    evaluate_digits,
    load_sample_set,
    paired_fid_difference,
)
from dice_ds.modes import MESH_MODES, Mode
from dice_ds.modes import MODES as ALL_MODES
from dice_ds.options import from_overrides, validate_options

MODES: tuple[Mode, ...] = tuple(m for m in ALL_MODES
                                if m.key != "dice-bf16" and m.key not in MESH_MODES)
"""The quality table's rows: every mode of ``dice_ds.modes`` (the payload-dtype variant and the
4-rank mesh modes aside: the sweep runs on 2 ranks)."""


@dataclass
class SweepConfig:
    """What the sweep runs; every field is recorded in the JSON output."""

    ckpt: str
    num_samples: int = 500
    steps: int | None = None
    """None: the sampler's default (50 for RF)."""
    batch: int = 125
    nproc: int = 2
    seed: int = 0
    cfg_scale: float = 1.5
    work_dir: str = "samples/quality_sweep"
    modes: tuple[str, ...] = field(default_factory=lambda: tuple(m.name for m in MODES))


def _dir_name(mode: Mode) -> str:
    return "".join(c if c.isalnum() else "_" for c in mode.name.lower()).strip("_")


def run_settings(cfg: SweepConfig, mode: Mode, out_dir: Path) -> Settings:
    """What ``mode``'s run samples: the sweep's job (the shipped digits model, same seeds in every
    mode, samples in ``out_dir``) with the mode's settings over it; ConfigError if the tree
    rejects them."""
    job = {"model": "digits", "ckpt": cfg.ckpt, "vae": "identity", "device": "cpu",
           "num_fid_samples": cfg.num_samples, "per_proc_batch_size": cfg.batch,
           "global_seed": cfg.seed, "cfg_scale": float(cfg.cfg_scale), "sample_dir": str(out_dir),
           **({} if cfg.steps is None else {"num_sampling_steps": cfg.steps})}
    return from_overrides(mode.settings, base=from_overrides(job))


def rejected_by_sampler(cfg: SweepConfig, mode: Mode, out_dir: Path) -> tuple[Settings | None,
                                                                               str | None]:
    """(the run's settings, None), or (None, the sampler's own ConfigError for them, e.g. a mode
    not implemented yet): the tree and the sampler's cross-field rules, run in this process before
    any rank is launched."""
    try:
        return validate_options(run_settings(cfg, mode, out_dir)), None
    except ConfigError as e:
        return None, str(e)


def launcher(cfg: SweepConfig) -> list[str]:
    """``torchrun`` of ``dice_ds.sample`` on ``cfg.nproc`` ranks; the sampler's arguments follow
    (``dice_ds.ds_config.write_config``: ``--config`` the run's settings file)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={cfg.nproc}", "-m", "dice_ds.sample"]


STAMP = "sweep_stamp.json"
SETTINGS = "settings.json"


def _stamp(cfg: SweepConfig, settings: Settings) -> dict:
    """What a run directory was made by: the rank count and the settings tree sampled."""
    return {"nproc": cfg.nproc, "settings": to_json(settings)}


def _read_stamp(out_dir: Path):
    try:
        return json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _complete(out_dir: Path, n: int, stamp: dict) -> bool:
    """True when ``out_dir`` holds n samples made with exactly ``stamp`` (recorded beside them)."""
    npz = out_dir / "samples.npz"
    if not npz.is_file() or _read_stamp(out_dir) != stamp:
        return False
    with np.load(npz) as f:
        return len(f["arr_0"]) >= n


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if "Error" in ln or "error:" in ln]
    return (lines or [ln.strip() for ln in text.splitlines() if ln.strip()] or ["(no output)"])[-1]


def run_mode(cfg: SweepConfig, mode: Mode, log) -> dict:
    """Sample one mode (unless already complete); returns {'dir', 'status', 'seconds'[, 'error']}."""
    out_dir = Path(cfg.work_dir) / _dir_name(mode)
    settings, rejected = rejected_by_sampler(cfg, mode, out_dir)
    if rejected is not None:
        log(f"[sweep] {mode.name}: not available: {rejected}")
        return {"dir": None, "status": "not available", "seconds": None, "error": rejected}
    stamp = _stamp(cfg, settings)
    if _complete(out_dir, cfg.num_samples, stamp):
        return {"dir": str(out_dir), "status": "ok", "seconds": None, "reused": True}
    if out_dir.exists() and _read_stamp(out_dir) != stamp:
        shutil.rmtree(out_dir)  # other settings: the sampler's resume would keep stale batches
    cmd = [*launcher(cfg), *write_config(settings, out_dir / SETTINGS)]
    (out_dir / STAMP).write_text(json.dumps(stamp))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log(f"[sweep] {mode.name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode == 0 and _complete(out_dir, cfg.num_samples, stamp):
        return {"dir": str(out_dir), "status": "ok", "seconds": seconds}
    error = _error_line(proc.stderr or proc.stdout)
    log(f"[sweep] {mode.name}: failed (exit {proc.returncode}): {error}")
    return {"dir": str(out_dir), "status": "failed", "seconds": seconds, "error": error}


def real_floor(classifier, n: int, seed: int) -> dict:
    """Metrics of n real digits drawn without replacement: the floor of digits-FID at this n."""
    images, labels = real_digits_uint8()
    idx = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
    return evaluate_digits(SampleSet(images[idx], labels[idx], "real digits"), classifier)


def run_sweep(cfg: SweepConfig, classifier, log=print) -> dict:
    """Sample and evaluate every selected mode; returns the JSON-able result."""
    modes = [m for m in MODES if m.name in cfg.modes]
    runs = {m.name: run_mode(cfg, m, log) for m in modes}
    sync = runs.get("sync EP")
    reference = load_sample_set(sync["dir"]) if sync and sync["status"] == "ok" else None
    rows = []
    for m in modes:
        row = {"mode": m.name, "settings": m.settings, "flags": " ".join(m.flags), "note": m.note,
               **runs[m.name]}
        if row["status"] == "ok":
            samples = load_sample_set(row["dir"])
            row.update(evaluate_digits(samples, classifier, reference))
            if reference is not None:
                d = paired_fid_difference(samples, reference, classifier)
                row.update(fid_delta_vs_sync=d["delta"], fid_delta_std=d["std"])
        rows.append(row)
    return {"config": cfg.__dict__ | {"modes": list(cfg.modes)}, "rows": rows,
            "real_digits_floor": real_floor(classifier, cfg.num_samples, cfg.seed),
            "ordering": ordering_statement(rows)}


# ----------------------------------------------------------------------------- report
PAPER_ORDER = ("sync EP", "DICE", "interweaved", "displaced EP")
PAPER_FID = {"sync EP": 5.31, "DICE": 6.11, "interweaved": 6.97, "displaced EP": 8.27}


def _order(rows: list[dict], key: str, reverse: bool = False) -> tuple[list[str], dict]:
    vals = {r["mode"]: r[key] for r in rows if key in r and r["mode"] in PAPER_ORDER}
    return sorted(vals, key=lambda m: vals[m], reverse=reverse), vals


def ordering_statement(rows: list[dict]) -> str:
    """Compare the measured order of the paper's four methods with the paper's FID order, by
    digits-FID (with the paired-bootstrap noise of each difference) and by deviation from sync."""
    by_fid, fid = _order(rows, "digits_fid")
    if len(by_fid) < 2:
        return "too few of sync EP / DICE / interweaved / displaced EP ran to compare orderings"
    paper = [m for m in PAPER_ORDER if m in fid]
    ours = " < ".join(f"{m} ({fid[m]:.2f})" for m in by_fid)
    verdict = "Same digits-FID ordering as" if by_fid == paper else "digits-FID ordering DIFFERS from"
    text = f"{verdict} the paper's ({' < '.join(paper)}): measured {ours}."
    deltas = [r for r in rows if r["mode"] in paper and r["mode"] != "sync EP"
              and r.get("fid_delta_std")]
    if deltas:
        resolved = [r["mode"] for r in deltas if abs(r["fid_delta_vs_sync"]) > 2 * r["fid_delta_std"]]
        text += (" FID differences from sync beyond 2 paired-bootstrap std: "
                 f"{', '.join(resolved) if resolved else 'none'}.")
    by_psnr, psnr = _order(rows, "psnr_db", reverse=True)
    if len(by_psnr) >= 2:
        same = by_psnr == [m for m in PAPER_ORDER if m in psnr]
        text += (f" By deviation from sync (PSNR, closest first): "
                 f"{' > '.join(f'{m} ({_fmt(psnr[m])} dB)' for m in by_psnr)}, "
                 f"{'the same order as' if same else 'a different order from'} the paper's FID.")
    return text


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def to_markdown(result: dict, command: str) -> str:
    cfg = result["config"]
    steps = cfg["steps"] if cfg["steps"] is not None else "default (50)"
    lines = [
        "| mode | flags | digits-FID ↓ | ΔFID vs sync (± 1 std) | class acc ↑ | PSNR vs sync (dB) ↑ "
        "| MSE vs sync |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | `{r['flags']}` | {r['status']}: {r.get('error', '')} "
                         "| – | – | – | – |")
            continue
        delta = (f"{r['fid_delta_vs_sync']:+.2f} ± {r['fid_delta_std']:.2f}"
                 if "fid_delta_std" in r else "–")
        lines.append(f"| {r['mode']} | `{r['flags'] or '(none)'}` | {_fmt(r['digits_fid'])} | {delta} | "
                     f"{_fmt(100 * r['class_accuracy'], 1)} % | {_fmt(r.get('psnr_db'))} | "
                     f"{_fmt(r.get('mse'), 6)} |")
    floor = result["real_digits_floor"]
    lines.append(f"| real digits ({floor['num_samples']} drawn) | – | {_fmt(floor['digits_fid'])} | – | "
                 f"{_fmt(100 * floor['class_accuracy'], 1)} % | – | – |")
    head = (f"Shipped `digits` model, {cfg['nproc']} ranks (gloo, CPU), {cfg['num_samples']} "
            f"samples per mode, global seed {cfg['seed']}, steps {steps}, cfg scale "
            f"{cfg['cfg_scale']}, same seeds in every mode.\n\nCommand: `{command}`\n")
    return head + "\n" + "\n".join(lines) + "\n\n" + result["ordering"] + "\n"


BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"


def write_report(result: dict, out_prefix: str, command: str) -> tuple[Path, Path]:
    """Write ``<prefix>.json`` and the table into ``<prefix>.md`` between the sweep markers
    (the rest of an existing document is kept; a new file holds the table alone)."""
    md, js = Path(out_prefix + ".md"), Path(out_prefix + ".json")
    md.parent.mkdir(parents=True, exist_ok=True)
    block = f"{BEGIN}\n{to_markdown(result, command)}{END}"
    text = md.read_text() if md.is_file() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = (text + "\n" if text else "") + block + "\n"
    md.write_text(text)
    js.write_text(json.dumps({"command": command, **result}, indent=1, default=str) + "\n")
    return md, js
