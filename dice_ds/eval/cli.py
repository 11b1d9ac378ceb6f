"""``dice-ds eval``: offline quality metrics of sample sets (``main(argv)``; dispatched by dice_ds.cli).

Owns the three entry points and their flags; bad input is a one-line error (exit 2), no traceback:

- ``dice-ds eval SAMPLES [--reference REF] [--classifier PATH] [--json OUT]``: digits metrics of a
  sample dir or ``.npz`` made with the shipped ``digits`` model: digits-FID against the real digits,
  class accuracy (labels saved by the sampler), and MSE/PSNR against REF (a run of the same seeds,
  normally the sync-EP run);
- ``dice-ds eval --fid SAMPLES.npz --reference REF.npz --inception-weights W.pth``: the full-scale
  FID-50K path (``dice_ds.eval.fid``; REF is the ADM batch or mu/sigma statistics);
- ``dice-ds eval --sweep [--out docs/quality] ...``: the quality table over parallel modes
  (``dice_ds.eval.sweep``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import zipfile
from pathlib import Path

import numpy as np

from dice_ds.config import ConfigError
from dice_ds.eval.classifier import CLASSIFIER_PATH, DIGITS_SIZE, load_classifier
from dice_ds.eval.fid import full_scale_metrics
from dice_ds.eval.metrics import evaluate_digits, load_sample_set
from dice_ds.eval.sweep import MODES, SweepConfig, run_sweep, write_report
from dice_ds.options import from_overrides


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like dice-ds sample
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dice-ds eval",
        description="Offline quality metrics: digits-FID / class accuracy / PSNR of a sample set "
                    "(default), FID-50K with Inception (--fid), or the quality table over parallel "
                    "modes (--sweep).")
    p.add_argument("samples", nargs="?", help="sample directory or samples.npz")
    p.add_argument("--reference", help="digits mode: sample dir/.npz of the same seeds (PSNR/MSE); "
                   "--fid: ADM reference batch .npz or an .npz with mu/sigma")
    p.add_argument("--classifier", help="digits classifier weights (default: the shipped one)")
    p.add_argument("--json", help="also write the result to this JSON file")
    g = p.add_argument_group("full-scale FID (--fid)")
    g.add_argument("--fid", action="store_true", help="FID/IS/precision/recall with InceptionV3")
    g.add_argument("--inception-weights", help="local torch-fidelity InceptionV3 weights (.pth)")
    g.add_argument("--device", default="cpu", help="device for the Inception forward (cpu|cuda)")
    g.add_argument("--batch-size", type=int, default=200, help="Inception batch size")
    s = p.add_argument_group("quality sweep (--sweep)")
    s.add_argument("--sweep", action="store_true", help="sample + evaluate every parallel mode")
    s.add_argument("--ckpt", help="model checkpoint (default: the shipped digits model)")
    s.add_argument("--num-samples", type=int, default=500)
    s.add_argument("--num-sampling-steps", type=int, default=None, help="default: the sampler's")
    s.add_argument("--per-proc-batch-size", type=int, default=125)
    s.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun)")
    s.add_argument("--global-seed", type=int, default=0)
    s.add_argument("--cfg-scale", type=float, default=1.5)
    s.add_argument("--modes", help="comma-separated subset of mode names (default: all)")
    s.add_argument("--work-dir", default="samples/quality_sweep", help="where runs are written")
    s.add_argument("--out", default="docs/quality", help="writes OUT.md (table block) + OUT.json")
    return p


def _digits(args) -> dict:
    if args.samples is None:
        raise ConfigError("give a sample directory or samples.npz (or --sweep)")
    samples = _load(load_sample_set, args.samples, "samples")
    check_sample_set(samples, f"samples {args.samples}", DIGITS_SIZE)
    reference = _load(load_sample_set, args.reference, "--reference") if args.reference else None
    if reference is not None:
        check_sample_set(reference, f"--reference {args.reference}", DIGITS_SIZE)
        if reference.images.shape != samples.images.shape:
            raise ConfigError(f"--reference {args.reference}: {list(reference.images.shape)} "
                              f"images vs {list(samples.images.shape)} in the samples; compare "
                              "runs of the same seeds and --num-fid-samples")
    return {"samples": args.samples, "reference": args.reference,
            **evaluate_digits(samples, _load(load_classifier, args.classifier, "--classifier"),
                              reference)}


def _load(fn, path, flag):
    if path is not None and Path(path).is_file() and Path(path).stat().st_size == 0:
        raise ConfigError(f"{flag} {path}: is empty (0 bytes)")
    try:
        return fn(path)
    except (FileNotFoundError, ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        text = str(e).strip().splitlines()
        if "pickle" in str(e) or isinstance(e, (zipfile.BadZipFile, EOFError)):
            text = [f"{path}: not a numpy .npz archive (corrupt or another format)"]
        raise ConfigError(f"{flag}: {text[0] if text else type(e).__name__}") from None


def check_sample_set(s, flag: str, digits_size: int | None = None) -> None:
    """One ConfigError line unless ``s`` holds N >= 1 uint8 images [N, H, W, 1 or 3] (+ N labels)."""
    images = np.asarray(s.images)
    if images.dtype != np.uint8:
        raise ConfigError(f"{flag}: arr_0 must be uint8 images, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"{flag}: arr_0 must have shape [N, H, W, 3] (or [N, H, W, 1]), got "
                          f"{list(images.shape)}")
    if images.shape[0] == 0:
        raise ConfigError(f"{flag}: holds no images (arr_0 has N = 0)")
    if digits_size is not None and images.shape[1:3] != (digits_size, digits_size):
        raise ConfigError(f"{flag}: images are {images.shape[1]}x{images.shape[2]}; the digits "
                          f"metrics need {digits_size}x{digits_size} (use --fid for other images)")
    if s.labels is not None and np.asarray(s.labels).shape != (images.shape[0],):
        raise ConfigError(f"{flag}: {np.asarray(s.labels).shape[0] if np.ndim(s.labels) else 0} "
                          f"labels for {images.shape[0]} images; labels must be int [N]")


def _sweep(args, argv: list[str]) -> dict:
    ckpt = args.ckpt or str(CLASSIFIER_PATH.parent / "digits_dit_moe.pt")
    if not Path(ckpt).is_file():
        raise ConfigError(f"--ckpt {ckpt}: no such file (default: the shipped digits model; "
                          f"train one with scripts/train_digits.py)")
    names = tuple(m.name for m in MODES)
    chosen = tuple(x.strip() for x in args.modes.split(",")) if args.modes else names
    unknown = [m for m in chosen if m not in names]
    if unknown:
        raise ConfigError(f"--modes: unknown {unknown}; choose from {', '.join(names)}")
    cfg = SweepConfig(ckpt=ckpt, num_samples=args.num_samples, steps=args.num_sampling_steps,
                      batch=args.per_proc_batch_size, nproc=args.nproc, seed=args.global_seed,
                      cfg_scale=args.cfg_scale, work_dir=args.work_dir, modes=chosen)
    if args.num_samples < 2 or args.num_samples % (args.nproc * args.per_proc_batch_size):
        raise ConfigError(f"--num-samples {args.num_samples} must be a positive multiple of "
                          f"--nproc x --per-proc-batch-size = "
                          f"{args.nproc * args.per_proc_batch_size}")
    result = run_sweep(cfg, _load(load_classifier, args.classifier, "--classifier"),
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    command = "dice-ds eval " + shlex.join(argv)
    md, js = write_report(result, args.out, command)
    return {"markdown": str(md), "json": str(js), "ordering": result["ordering"]}


def _jsonable(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.fid and args.sweep:
            raise ConfigError("--fid and --sweep are separate jobs: give one of them")
        for flag in ("batch_size", "num_samples", "per_proc_batch_size", "nproc"):
            if getattr(args, flag) < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
        # the sweep's sampling settings: checked by the settings tree (its ranges)
        from_overrides({"cfg_scale": args.cfg_scale, "num_sampling_steps": args.num_sampling_steps})
        if args.fid and args.samples is None:
            raise ConfigError("--fid needs a sample directory or samples.npz")
        if args.fid:
            result = {"samples": args.samples, "reference": args.reference,
                      **full_scale_metrics(args.samples, args.reference, args.inception_weights,
                                           args.device, args.batch_size)}
        elif args.sweep:
            result = _sweep(args, argv)
        else:
            result = _digits(args)
    except ConfigError as e:
        print(f"dice-ds eval: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in ("sklearn", "scipy"):
            raise
        print(f"dice-ds eval: error: needs {e.name}: pip install -e '.[eval]' (scikit-learn, scipy)",
              file=sys.stderr)
        return 2
    text = json.dumps(_jsonable(result), indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
