"""Few-step schedulers against the stale modes: digits-FID and PSNR vs sync (docs/quality.md).

Two phases, one script:

    torchrun --standalone --nproc_per_node 2 scripts/scheduler_quality.py sample OUT
    python scripts/scheduler_quality.py table OUT

``sample`` builds ``DiTMoEPipeline.from_pretrained("digits", **mode)`` for each mode (sync EP and
the stale modes: displaced EP, interweaved, DICE, displaced SP; the rows of ``dice_ds/modes.py``)
and samples the same 500 positions (global seed 0, the CLI's labels and noise, cfg 1.5) with each
scheduler (the default: rectified-flow Euler; ``DPMSolverMultistepScheduler.from_config(
pipe.scheduler.config)``: DPM-Solver++ order 2 with flow sigmas) at 10, 25 and 50 steps; rank 0
writes ``OUT/<mode>/<scheduler>_<steps>.npz`` (uint8 images as ``dice-ds sample`` writes them,
labels). ``table`` evaluates them with ``dice-ds eval``'s digits metrics
(``dice_ds.eval.metrics``): digits-FID, its paired-bootstrap difference from sync of the same
scheduler and step count, PSNR vs that sync run, and prints the markdown table (and writes
``OUT/table.json``).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

MODES = {"sync EP": "sync", "displaced EP": "displaced", "interweaved": "interweaved",
         "DICE": "dice", "displaced SP": "sp-async"}
SCHEDULERS = {"default (RF Euler)": None, "DPM-Solver++": "DPMSolverMultistepScheduler"}
STEPS = (10, 25, 50)
N, SEED = 500, 0


def _file(out: str, mode: str, scheduler: str, steps: int) -> str:
    tag = "default" if SCHEDULERS[scheduler] is None else "dpmpp"
    return os.path.join(out, MODES[mode], f"{tag}_{steps}.npz")


def sample(out: str) -> None:
    import diffusers
    import torch.distributed as dist

    from dice_ds import DiTMoEPipeline
    from dice_ds.diffusion import labels_for
    from dice_ds.modes import MODES as ROWS

    settings = {m.key: m.settings for m in ROWS}
    labels = labels_for(SEED, list(range(N)), 10)  # the CLI's labels of indices 0..N-1
    for mode, key in MODES.items():
        pipe = DiTMoEPipeline.from_pretrained("digits", **settings[key])
        pipe.set_progress_bar_config(disable=True)
        default = pipe.scheduler
        for scheduler, cls in SCHEDULERS.items():
            pipe.scheduler = default if cls is None else getattr(diffusers, cls).from_config(
                default.config)
            for steps in STEPS:
                images = pipe(class_labels=labels, num_inference_steps=steps, seed=SEED).images
                if images is not None:
                    path = _file(out, mode, scheduler, steps)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    np.savez(path, arr_0=np.stack([np.asarray(im) for im in images]),
                             labels=np.asarray(labels))
                    print(f"{mode} {scheduler} {steps}: {path}", flush=True)
        pipe.runtime.detach()
        dist.barrier()


def table(out: str) -> str:
    from dice_ds.eval.classifier import load_classifier
    from dice_ds.eval.metrics import evaluate_digits, load_sample_set, paired_fid_difference

    clf = load_classifier()
    rows, raw = [], []
    for scheduler in SCHEDULERS:
        for steps in STEPS:
            sync = load_sample_set(_file(out, "sync EP", scheduler, steps))
            for mode in MODES:
                s = load_sample_set(_file(out, mode, scheduler, steps))
                m = evaluate_digits(s, clf, reference=sync)
                d = paired_fid_difference(s, sync, clf)
                raw.append({"scheduler": scheduler, "steps": steps, "mode": mode, **m,
                            "delta_fid": d["delta"], "delta_fid_std": d["std"]})
                psnr = "∞" if m["psnr_db"] == float("inf") else f"{m['psnr_db']:.2f}"
                rows.append(f"| {scheduler} | {steps} | {mode} | {m['digits_fid']:.2f} | "
                            f"{d['delta']:+.2f} ± {d['std']:.2f} | "
                            f"{100 * m['class_accuracy']:.1f} % | {psnr} |")
    json.dump(raw, open(os.path.join(out, "table.json"), "w"), indent=1)
    head = ("| scheduler | steps | mode | digits-FID ↓ | ΔFID vs sync (± 1 std) | class acc ↑ | "
            "PSNR vs sync (dB) ↑ |\n|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("sample", "table"))
    p.add_argument("out")
    args = p.parse_args()
    if args.phase == "sample":
        sample(args.out)
    else:
        print(table(args.out))


if __name__ == "__main__":
    main()
