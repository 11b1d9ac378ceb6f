"""``dice-ds tune --evidence N``: the tuned policy vs DICE's fixed policy and the selective-sync modes.

Owns sampling sync EP, DICE's fixed policy, the tuned policy and every mode of ``EVIDENCE_MODES``
(``dice_ds.modes``: all layers async, and each selective-sync layer set) with the same seeds through
the quality sweep's runner (``dice_ds.eval.sweep.run_mode``: one ``torchrun --nproc_per_node W`` per
policy, reused when complete; ``tuned`` and the modes are settings, merged over the sweep's job and
handed to the sampler as a ``settings.json`` tree, never as flags), and scoring each against the
sync run: PSNR / MSE (the same metric as docs/quality.md), digits-FID and class accuracy, next to
the predicted PSNR.
"""

from __future__ import annotations

from dice_ds.eval.classifier import load_classifier
from dice_ds.eval.metrics import evaluate_digits, load_sample_set
from dice_ds.eval.sweep import SweepConfig, run_mode
from dice_ds.modes import DICE, Mode, by_key

EVIDENCE_MODES = ("interweaved", "iw-deep-sync", "iw-shallow-sync", "iw-staggered", "iw-low")
"""The fixed policies the tuned one is compared with besides DICE (keys of dice_ds/modes.py)."""


def run(ckpt: str, tuned: dict, n: int, steps: int, cfg_scale: float, world: int,
        work_dir: str = "samples/tune_evidence", log=print,
        extra: tuple[str, ...] = EVIDENCE_MODES, also: tuple = ()) -> list[dict]:
    cfg = SweepConfig(ckpt=ckpt, num_samples=n, steps=steps, batch=-(-n // world), nproc=world,
                      cfg_scale=cfg_scale, work_dir=work_dir)
    modes = [by_key("sync"), Mode("dice", "DICE (fixed)", DICE), Mode("tuned", "tuned", tuned),
             *also, *(by_key(k) for k in extra)]
    runs = {m.key: run_mode(cfg, m, log) for m in modes}
    if runs["sync"]["status"] != "ok":
        raise RuntimeError(f"sync EP run failed: {runs['sync'].get('error')}")
    clf = load_classifier()
    ref = load_sample_set(runs["sync"]["dir"])
    rows = []
    for m in modes:
        r = runs[m.key]
        row = {"policy": m.name, "key": m.key, "settings": m.settings,
               "flags": " ".join(m.flags), **r}
        if r["status"] == "ok":
            row.update(evaluate_digits(load_sample_set(r["dir"]), clf, ref))
        rows.append(row)
    return rows
