"""Layer sensitivity for ``dice-ds tune``: how much each MoE layer's output moves from step to step.

Owns ``measure``: one single-process rectified-flow run (no process group beyond the 1-rank world
the model builder needs) with forward hooks on every MoE layer, its shared expert and its router.
Per layer l and step i (counting down S..1) it records

- ``stale[k][l][i]`` = ||r_l(i) - r_l(i + k)|| / ||o_l(i)|| for k = 1, 2: r = the routed-expert
  part of the output (MoE output minus shared expert; the part a stale exchange replaces), o = the
  whole MoE output. A 1-step stale call (interweaved) substitutes r(i + 1) for r(i), a 2-step
  stale call (displaced) r(i + 2). 0 where i + k > S (those steps are sync anyway);
- ``low_share[l]``: mean over tokens and steps of p_low / (p_low + p_high), the lower top-2 router
  prob's share: conditional communication 'low' replaces that slot's output with a cached one.

Nothing here is timed. The table is plain JSON (``save`` / ``load``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dice_ds import mcore
from dice_ds.config import get_flavor
from dice_ds.diffusion import draw_conditions, step_rule
from dice_ds.models import build_model
from dice_ds.parallel.groups import init_distributed
from dice_ds.pipeline.denoise import denoise
from dice_ds.weights.check import config_for_checkpoint
from dice_ds.weights.load import load_into_model
from dice_ds.weights.read import open_checkpoint


def _tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def measure(ckpt: str, model_name: str = "digits", num_samples: int = 64, steps: int = 50,
            cfg_scale: float = 1.5, seed: int = 0) -> dict:
    mcore.prepare("cpu")  # an entry point: megatron's CPU patches, a 1-rank world
    init_distributed("cpu")
    with open_checkpoint(ckpt) as reader:  # names and shapes first, then this model's tensors
        cfg = config_for_checkpoint(get_flavor(model_name), reader.meta_state_dict())
        model = build_model(cfg)
        load_into_model(model, reader)
    model.eval()
    layers = model.moe_layers()  # in moe_index order
    full: dict[int, list] = {m.moe_index: [] for m in layers}
    shared: dict[int, list] = {m.moe_index: [] for m in layers}
    share: dict[int, list] = {m.moe_index: [] for m in layers}
    hooks = []
    for m in layers:
        idx = m.moe_index
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, idx=idx: full[idx].append(_tensor(out).detach().reshape(-1).clone())))
        hooks.append(m.shared_experts.register_forward_hook(
            lambda mod, inp, out, idx=idx: shared[idx].append(_tensor(out).detach().reshape(-1).clone())))

        def router_hook(mod, inp, out, idx=idx):
            probs = _tensor(out).detach().float()
            top = probs.topk(2, dim=-1).values
            share[idx].append(float((top[:, 1] / top.sum(-1).clamp_min(1e-12)).mean()))

        hooks.append(m.router.register_forward_hook(router_hook))
    z, y, _ = draw_conditions(seed, list(range(num_samples)), cfg.in_channels, cfg.input_size,
                              cfg.num_classes)
    with torch.no_grad():
        denoise(step_rule("rf", steps), model, z, y, cfg_scale)
    for h in hooks:
        h.remove()
    L = cfg.depth
    stale = {"1": [[0.0] * (steps + 1) for _ in range(L)],
             "2": [[0.0] * (steps + 1) for _ in range(L)]}
    for l in range(L):
        routed = [f - s for f, s in zip(full[l], shared[l])]
        assert len(routed) == steps, f"layer {l}: {len(routed)} calls for {steps} steps"
        for c in range(steps):  # call c is step i = S - c
            i = steps - c
            for k in (1, 2):
                if c - k >= 0:
                    diff = (routed[c] - routed[c - k]).norm() / full[l][c].norm().clamp_min(1e-12)
                    stale[str(k)][l][i] = float(diff)
    return {"model": model_name, "ckpt": str(ckpt), "steps": steps, "depth": L,
            "cfg_scale": cfg_scale, "num_samples": num_samples, "seed": seed,
            "stale": stale, "low_share": [sum(share[l]) / len(share[l]) for l in range(L)],
            "note": "stale[k][l][i]: i = step index S..1 (list index i; index 0 unused)"}


def save(table: dict, path: str) -> None:
    Path(path).write_text(json.dumps(table, indent=1) + "\n")


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())
