"""Train the shipped ``digits`` DiT-MoE: class-conditional rectified flow on scikit-learn's digits.

Owns the recipe that produced ``dice_ds/assets/digits_dit_moe.pt`` (reproducible from ``--seed`` on
the same torch build and thread count):

- model: the ``digits`` flavor (dice_ds.config), DiT init (adaLN-Zero), pixel space 1×16×16;
- data: ``dice_ds.data`` train split, random horizontal shifts of ±1 px as the only augmentation;
- RF convention (spec §1.4): z_t = (1−t)·x0 + t·ε, target v = ε − x0, t = sigmoid(N(0, 1)), MSE on
  the ``in_channels`` prediction channels, labels dropped to the null class with p = 0.1;
- a switch-style router balance loss α·E·Σ_e P_e·f_e (α = 0.01, the DiT-MoE "expert-level balance
  loss"), computed from each router's input by a forward hook, because the megatron layers are built
  with load balancing 'none' for inference;
- AdamW, linear warm-up then cosine decay, an EMA of the weights; the EMA is saved in the released
  DiT-MoE key format (``{"ema": sd}``, fp16) plus a metadata JSON beside it.

Usage: ``python scripts/train_digits.py --steps 2500 --out dice_ds/assets/digits_dit_moe.pt``.
Shape legend: N batch, C channels, H/W pixels, S tokens (megatron's sequence dim), E experts, D hidden.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dice_ds import mcore
from dice_ds.config import get_flavor
from dice_ds.data import load_digits_tensors
from dice_ds.models import build_model, init_weights
from dice_ds.parallel.groups import init_distributed
from dice_ds.weights.save import save_checkpoint

BALANCE_ALPHA = 0.01
LABEL_DROP = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", default="dice_ds/assets/digits_dit_moe.pt")
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="also save the EMA every N steps to OUT with suffix .stepN.pt (0: never)")
    return p.parse_args(argv)


class BalanceLoss:
    """Collects α·E·Σ_e P_e·f_e from every router's forward (P: mean softmax prob, f: load share)."""

    def __init__(self, model, alpha: float = BALANCE_ALPHA):
        self.alpha = alpha
        self.terms: list[torch.Tensor] = []
        self.loads: list[torch.Tensor] = []
        for moe in model.moe_layers():
            moe.router.register_forward_hook(self._hook)

    def _hook(self, router, inputs, output):
        if not router.training:
            return
        h_SD = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        probs_SE = F.softmax(h_SD @ router.weight.float().t(), dim=-1)
        routing_map_SE = output[1]
        e = probs_SE.shape[-1]
        f_E = routing_map_SE.float().mean(0) * e / routing_map_SE.sum(-1).float().mean()
        self.terms.append(self.alpha * (probs_SE.mean(0) * f_E).sum())
        self.loads.append(routing_map_SE.float().sum(0).detach())

    def pop(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = torch.stack(self.terms).sum() if self.terms else torch.zeros(())
        loads, self.terms, self.loads = self.loads, [], []
        return loss, loads


def rf_loss(model, x0_NCHW, y_N, gen, num_classes: int) -> torch.Tensor:
    """Rectified-flow velocity MSE with logit-normal t and label dropout to the null class."""
    n = x0_NCHW.shape[0]
    t_N = torch.sigmoid(torch.randn(n, generator=gen))
    eps = torch.randn(x0_NCHW.shape, generator=gen)
    t4 = t_N.view(n, 1, 1, 1)
    z_t = (1 - t4) * x0_NCHW + t4 * eps
    drop = torch.rand(n, generator=gen) < LABEL_DROP
    y_in = torch.where(drop, torch.full_like(y_N, num_classes), y_N)
    v_pred = model(z_t, t_N, y_in)[:, : x0_NCHW.shape[1]]
    return F.mse_loss(v_pred, eps - x0_NCHW)


def random_shift(x_NCHW: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ±max_shift px in x and y, padding with background (-1)."""
    n, _, h, w = x_NCHW.shape
    pad = F.pad(x_NCHW, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def save_ema(model, ema: dict[str, torch.Tensor], out: Path) -> None:
    """Write the EMA weights in the released key format, fp16 storage."""
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ema[n])
        save_checkpoint(model, out, dtype=torch.float16)
        for n, p in model.named_parameters():
            p.copy_(live[n])


def train(args) -> dict:
    torch.manual_seed(args.seed)
    cfg = get_flavor("digits")
    model = init_weights(build_model(cfg), "dit", seed=args.seed).train()
    balance = BalanceLoss(model)
    x_train, y_train = load_digits_tensors("train")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(args.seed + 1)
    log, t0, cpu0, running = [], time.perf_counter(), time.process_time(), None
    loads_E = torch.zeros(cfg.num_experts)
    for step in range(args.steps):
        idx = torch.randint(0, len(y_train), (args.batch_size,), generator=gen)
        x0 = random_shift(x_train[idx], gen)
        loss = rf_loss(model, x0, y_train[idx], gen, cfg.num_classes)
        aux, loads = balance.pop()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for n, p in model.named_parameters():
                ema[n].lerp_(p.detach(), 1 - decay)
        loads_E += torch.stack(loads).sum(0)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": round(running, 5), "aux": round(aux.item(), 5),
                   "seconds": round(el, 1), "steps_per_s": round((step + 1) / el, 3)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0:
            save_ema(model, ema, Path(args.out).with_suffix(f".step{step + 1}.pt"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    save_ema(model, ema, Path(args.out))
    share = (loads_E / loads_E.sum()).tolist()
    return {"wall_seconds": round(wall, 1), "process_cpu_seconds": round(cpu, 1),
            "final_loss_ema": round(running, 5),
            "expert_load_share": [round(s, 4) for s in share], "log": log}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # Adam moments of near-zero grads go subnormal: 3x slower on x86
    mcore.prepare("cpu")  # an entry point: megatron's CPU patches, a 1-rank world
    init_distributed("cpu")
    result = train(args)
    meta = {
        "what": "digits DiT-MoE, class-conditional rectified flow, pixel space 1x16x16, EMA weights",
        "flavor": "digits", "format": "released DiT-MoE keys, {'ema': sd}, fp16",
        "command": "python scripts/train_digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "torch": torch.__version__, "threads": args.threads, **result,
    }
    meta_path = Path(args.out).with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB) and {meta_path}")


if __name__ == "__main__":
    main()
