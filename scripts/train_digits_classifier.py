"""Train the shipped digits classifier (``dice_ds/assets/digits_classifier.pt``) used by ``dice-ds eval``.

Owns the recipe: ``dice_ds.eval.classifier.DigitsClassifier`` on the ``dice_ds.data`` train split,
with augmentation that makes it robust to generated samples (random ±1 px shifts, small Gaussian
pixel noise, random contrast), AdamW + cosine decay, fixed seed. The images go through the same uint8
round trip as sampled images, so the classifier sees exactly the sampler's quantisation. Reports
held-out test accuracy and writes a metadata JSON beside the weights.

Usage: ``python scripts/train_digits_classifier.py --out dice_ds/assets/digits_classifier.pt``.
Shape legend: N batch, H/W pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dice_ds.data import from_uint8, load_digits_tensors, to_uint8
from dice_ds.eval.classifier import DigitsClassifier, classify


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="dice_ds/assets/digits_classifier.pt")
    return p.parse_args(argv)


def augment(x_N1HW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random ±1 px shift (background padding), contrast in [0.8, 1.2], pixel noise σ = 0.1."""
    n, _, h, w = x_N1HW.shape
    pad = F.pad(x_N1HW, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    x = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    contrast = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    x = (x + 1) * contrast - 1
    return (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def quantised(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits_tensors(split)
    return from_uint8(to_uint8(x)), y


def train(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = quantised("train")
    x_test, y_test = quantised("test")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for idx in perm.split(args.batch_size):
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        _, pred = classify(model, x_test)
        acc = (pred == y_test).double().mean().item()
        print(json.dumps({"epoch": epoch + 1, "loss": round(loss.item(), 4), "test_acc": round(acc, 4)}),
              flush=True)
    _, pred_train = classify(model, x_train)
    return {"model": model, "wall_seconds": round(time.perf_counter() - t0, 1),
            "test_accuracy": round(acc, 4),
            "train_accuracy": round((pred_train == y_train).double().mean().item(), 4),
            "num_train": len(y_train), "num_test": len(y_test)}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args)
    model = result.pop("model")
    out = Path(args.out)
    torch.save(model.state_dict(), out)
    meta = {
        "what": "digits classifier for dice-ds eval; features = 64-d penultimate layer (digits-FID)",
        "command": "python scripts/train_digits_classifier.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "torch": torch.__version__, **result,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved {out} ({out.stat().st_size / 1e3:.0f} kB), test accuracy {result['test_accuracy']}")


if __name__ == "__main__":
    main()
