"""``dice-ds tune --evidence N``: the tuned policy vs DICE's fixed policy on the shipped model.

Owns sampling sync EP, DICE's fixed policy and the tuned policy with the same seeds through the
quality sweep's runner (``dice_ds.eval.sweep.run_mode``: one ``torchrun --nproc_per_node W`` per
policy, reused when complete), and scoring each against the sync run: PSNR / MSE (the same
metric as docs/quality.md), digits-FID and class accuracy, next to the predicted PSNR.
"""

from __future__ import annotations

from dice_ds.modes import DICE_FLAGS, Mode


def run(ckpt: str, tuned_flags: list[str], n: int, steps: int, cfg_scale: float, world: int,
        work_dir: str = "samples/tune_evidence", log=print) -> list[dict]:
    from dice_ds.eval.classifier import load_classifier
    from dice_ds.eval.metrics import evaluate_digits, load_sample_set
    from dice_ds.eval.sweep import SweepConfig, run_mode

    cfg = SweepConfig(ckpt=ckpt, num_samples=n, steps=steps, batch=-(-n // world), nproc=world,
                      cfg_scale=cfg_scale, work_dir=work_dir)
    modes = [Mode("sync", "sync EP", ("--ep",)), Mode("dice", "DICE (fixed)", DICE_FLAGS),
             Mode("tuned", "tuned", tuple(tuned_flags))]
    runs = {m.key: run_mode(cfg, m, log) for m in modes}
    if runs["sync"]["status"] != "ok":
        raise RuntimeError(f"sync EP run failed: {runs['sync'].get('error')}")
    clf = load_classifier()
    ref = load_sample_set(runs["sync"]["dir"])
    rows = []
    for m in modes:
        r = runs[m.key]
        row = {"policy": m.name, "flags": " ".join(m.flags), **r}
        if r["status"] == "ok":
            row.update(evaluate_digits(load_sample_set(r["dir"]), clf, ref))
        rows.append(row)
    return rows
