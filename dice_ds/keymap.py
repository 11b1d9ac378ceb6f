"""Key map between released DiT-MoE state dicts (spec §1.3) and dice_ds's megatron layout.

Owns the pure renaming/reshaping of MoE keys; everything else keeps its released name.

| released (per block b, expert e)                    | dice_ds (megatron-core)                                   |
|-----------------------------------------------------|-----------------------------------------------------------|
| ``blocks.b.moe.gate.weight`` [E, h]                  | ``blocks.b.moe.router.weight``                            |
| ``blocks.b.moe.experts.e.{gate,up}_proj.weight``     | ``blocks.b.moe.experts.local_experts.i.linear_fc1.weight`` = cat(gate, up) |
| ``blocks.b.moe.experts.e.down_proj.weight``          | ``blocks.b.moe.experts.local_experts.i.linear_fc2.weight`` |
| ``blocks.b.moe.shared_experts.{gate,up}_proj.weight``| ``blocks.b.moe.shared_experts.linear_fc1.weight``         |
| ``blocks.b.moe.shared_experts.down_proj.weight``     | ``blocks.b.moe.shared_experts.linear_fc2.weight``         |

``i`` is the local index of global expert ``e`` on this rank (megatron places experts contiguously:
rank r of an EP group of size W holds experts [r·E/W, (r+1)·E/W)).
"""

from __future__ import annotations

import re

import torch

_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED = re.compile(r"^blocks\.(\d+)\.moe\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight$")
_GATE = re.compile(r"^blocks\.(\d+)\.moe\.gate\.weight$")


def released_to_mcore(sd: dict[str, torch.Tensor], local_experts: range | None = None,
                      ) -> dict[str, torch.Tensor]:
    """Rename a released state dict to dice_ds keys, keeping only ``local_experts`` (global ids).

    ``local_experts=None`` keeps every expert. Keys that are not MoE keys pass through unchanged;
    an expert projection without its partner raises ``KeyError``.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    shared: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if m := _EXPERT.match(key):
            b, e, part = int(m.group(1)), int(m.group(2)), m.group(3)
            if local_experts is None or e in local_experts:
                experts.setdefault((b, e), {})[part] = value
        elif m := _SHARED.match(key):
            shared.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif m := _GATE.match(key):
            out[f"blocks.{m.group(1)}.moe.router.weight"] = value
        else:
            out[key] = value
    first = local_experts.start if local_experts is not None else 0
    for (b, e), parts in experts.items():
        prefix = f"blocks.{b}.moe.experts.local_experts.{e - first}"
        out.update(_mlp_to_mcore(prefix, parts, f"blocks.{b}.moe.experts.{e}"))
    for b, parts in shared.items():
        out.update(_mlp_to_mcore(f"blocks.{b}.moe.shared_experts", parts,
                                 f"blocks.{b}.moe.shared_experts"))
    return out


def _mlp_to_mcore(prefix: str, parts: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
    missing = {"gate_proj", "up_proj", "down_proj"} - parts.keys()
    if missing:
        raise KeyError(f"{src}: missing {', '.join(sorted(f'{src}.{m}.weight' for m in missing))}")
    return {
        f"{prefix}.linear_fc1.weight": torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0),
        f"{prefix}.linear_fc2.weight": parts["down_proj"],
    }


_MC_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_MC_SHARED = re.compile(r"^blocks\.(\d+)\.moe\.shared_experts\.(linear_fc1|linear_fc2)\.weight$")
_MC_ROUTER = re.compile(r"^blocks\.(\d+)\.moe\.router\.weight$")


def mcore_to_released(sd: dict[str, torch.Tensor], first_expert: int = 0) -> dict[str, torch.Tensor]:
    """Inverse of :func:`released_to_mcore` (drops megatron ``_extra_state`` entries).

    ``first_expert`` is the global id of local expert 0 (0 for a single-process model).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("._extra_state"):
            continue
        if m := _MC_EXPERT.match(key):
            b, i, which = m.group(1), int(m.group(2)), m.group(3)
            out.update(_mlp_to_released(f"blocks.{b}.moe.experts.{i + first_expert}", which, value))
        elif m := _MC_SHARED.match(key):
            out.update(_mlp_to_released(f"blocks.{m.group(1)}.moe.shared_experts", m.group(2), value))
        elif m := _MC_ROUTER.match(key):
            out[f"blocks.{m.group(1)}.moe.gate.weight"] = value
        else:
            out[key] = value
    return out


def _mlp_to_released(prefix: str, which: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    if which == "linear_fc2":
        return {f"{prefix}.down_proj.weight": value}
    gate, up = value.chunk(2, dim=0)
    return {f"{prefix}.gate_proj.weight": gate.clone(), f"{prefix}.up_proj.weight": up.clone()}
