"""Key map between released DiT-MoE state dicts (spec §1.3) and dice_ds's megatron layout.

Owns the pure renaming/reshaping of MoE keys; everything else keeps its released name.

| released (per block b, expert e)                    | dice_ds (megatron-core)                                   |
|-----------------------------------------------------|-----------------------------------------------------------|
| ``blocks.b.moe.gate.weight`` [E, h]                  | ``blocks.b.moe.router.weight``                            |
| ``blocks.b.moe.experts.e.{gate,up}_proj.weight``     | ``blocks.b.moe.experts.local_experts.i.linear_fc1.weight`` = cat(gate, up) |
| ``blocks.b.moe.experts.e.down_proj.weight``          | ``blocks.b.moe.experts.local_experts.i.linear_fc2.weight`` |
| ``blocks.b.moe.shared_experts.{gate,up}_proj.weight``| ``blocks.b.moe.shared_experts.linear_fc1.weight``         |
| ``blocks.b.moe.shared_experts.down_proj.weight``     | ``blocks.b.moe.shared_experts.linear_fc2.weight``         |

``i`` is the local index of global expert ``e`` on this rank: its position in the rank's list of
global expert ids (megatron places experts contiguously: rank r of an EP group of size W holds
experts [r·E/W, (r+1)·E/W), so ``i = e - r·E/W``; any other placement is passed as an explicit list).

With ``ModelConfig.experts_impl = "grouped"`` (``dice_ds/models/experts.py``) a layer's local experts
are stacked along a leading dim, in local order (``experts_layout="grouped"`` below):

| released (per block b, local experts e_0..e_{L-1})  | dice_ds grouped layout                                    |
|-----------------------------------------------------|-----------------------------------------------------------|
| ``blocks.b.moe.experts.e_i.{gate,up}_proj.weight``   | ``blocks.b.moe.experts.fc1_weight[i]`` = cat(gate, up)    |
| ``blocks.b.moe.experts.e_i.down_proj.weight``        | ``blocks.b.moe.experts.fc2_weight[i]``                    |
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED = re.compile(r"^blocks\.(\d+)\.moe\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight$")
_GATE = re.compile(r"^blocks\.(\d+)\.moe\.gate\.weight$")


EXPERTS_LAYOUTS = ("sequential", "grouped")


def released_to_mcore(sd: dict[str, torch.Tensor], local_experts: Sequence[int] | None = None,
                      experts_layout: str = "sequential") -> dict[str, torch.Tensor]:
    """Rename a released state dict to dice_ds keys, keeping only ``local_experts`` (global ids).

    ``local_experts`` (a ``range`` or any sequence of distinct global ids) lists this rank's experts
    in local order; ``None`` keeps every expert under its global id. Keys that are not MoE keys pass
    through unchanged; an expert projection without its partner raises ``KeyError``.
    ``experts_layout="grouped"`` stacks each layer's experts (see the module doc); then every local
    expert must be present (``None``: experts 0..n-1 of each layer), else ``KeyError``.
    """
    if experts_layout not in EXPERTS_LAYOUTS:
        raise ValueError(f"experts_layout={experts_layout!r}: choose one of {EXPERTS_LAYOUTS}")
    local_index = None if local_experts is None else {e: i for i, e in enumerate(local_experts)}
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    shared: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if m := _EXPERT.match(key):
            b, e, part = int(m.group(1)), int(m.group(2)), m.group(3)
            if local_index is None or e in local_index:
                experts.setdefault((b, e), {})[part] = value
        elif m := _SHARED.match(key):
            shared.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif m := _GATE.match(key):
            out[f"blocks.{m.group(1)}.moe.router.weight"] = value
        else:
            out[key] = value
    per_layer: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for (b, e), parts in experts.items():
        i = e if local_index is None else local_index[e]
        prefix = f"blocks.{b}.moe.experts.local_experts.{i}"
        mapped = _mlp_to_mcore(prefix, parts, f"blocks.{b}.moe.experts.{e}")
        if experts_layout == "grouped":
            per_layer.setdefault(b, {})[i] = mapped
        else:
            out.update(mapped)
    for b, by_local in per_layer.items():
        out.update(_stack_layer(b, by_local, local_experts))
    for b, parts in shared.items():
        out.update(_mlp_to_mcore(f"blocks.{b}.moe.shared_experts", parts,
                                 f"blocks.{b}.moe.shared_experts"))
    return out


def _stack_layer(b: int, by_local: dict[int, dict[str, torch.Tensor]],
                 local_experts: Sequence[int] | None) -> dict[str, torch.Tensor]:
    """One layer's per-expert (sequential-layout) tensors stacked into the grouped layout."""
    n = len(by_local) if local_experts is None else len(local_experts)
    ids = list(range(n)) if local_experts is None else list(local_experts)
    missing = [ids[i] for i in range(n) if i not in by_local]
    if missing or len(by_local) != n:
        raise KeyError(f"blocks.{b}.moe.experts: missing expert(s) {missing or sorted(by_local)} "
                       f"(the grouped layout needs all local experts {ids})")
    out = {}
    for which, name in (("linear_fc1", "fc1_weight"), ("linear_fc2", "fc2_weight")):
        out[f"blocks.{b}.moe.experts.{name}"] = torch.stack(
            [by_local[i][f"blocks.{b}.moe.experts.local_experts.{i}.{which}.weight"] for i in range(n)])
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
_MC_GROUPED = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(fc1_weight|fc2_weight)$")
_MC_ROUTER = re.compile(r"^blocks\.(\d+)\.moe\.router\.weight$")


def mcore_to_released(sd: dict[str, torch.Tensor], first_expert: int = 0,
                      expert_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`released_to_mcore`, either experts layout (drops ``_extra_state`` entries).

    ``first_expert`` is the global id of local expert 0 (0 for a single-process model), for
    contiguous placement; ``expert_ids`` (global id of each local expert, in local order) overrides it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("._extra_state"):
            continue
        if m := _MC_EXPERT.match(key):
            b, i, which = m.group(1), int(m.group(2)), m.group(3)
            e = i + first_expert if expert_ids is None else expert_ids[i]
            out.update(_mlp_to_released(f"blocks.{b}.moe.experts.{e}", which, value))
        elif m := _MC_GROUPED.match(key):
            b, which = m.group(1), "linear_fc1" if m.group(2) == "fc1_weight" else "linear_fc2"
            for i, value_i in enumerate(value.unbind(0)):
                e = i + first_expert if expert_ids is None else expert_ids[i]
                value_i = value_i if which == "linear_fc1" else value_i.clone()  # no shared storage
                out.update(_mlp_to_released(f"blocks.{b}.moe.experts.{e}", which, value_i))
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


# ----------------------------------------------------------------------------- name-level plan
# The streaming loader (dice_ds/weights/load.py) never builds a mapped state dict: it asks, per
# model tensor, which released tensors fill which rows of it, and per released name, which region of
# which checkpoint tensor holds it. A region is (key, index along dim 0 or None, (row lo, row hi) of
# the next dim or None); for a contiguous tensor it is one contiguous byte range.

def released_sources(key: str, shape: Sequence[int], local_experts: Sequence[int]
                     ) -> list[tuple[str, int | None, tuple[int, int] | None]]:
    """What fills model tensor ``key`` (shape ``shape``): [(released key, dest index, dest rows)].

    ``local_experts`` are the global ids of the model's experts in local order. Either experts
    layout; non-MoE keys map to themselves.
    """
    if m := _MC_ROUTER.match(key):
        return [(f"blocks.{m.group(1)}.moe.gate.weight", None, None)]
    if m := _MC_GROUPED.match(key):
        b, fc1 = m.group(1), m.group(2) == "fc1_weight"
        out = []
        for i, e in enumerate(local_experts):
            out += _mlp_sources(f"blocks.{b}.moe.experts.{e}", fc1, shape[1], i)
        return out
    if m := _MC_EXPERT.match(key):
        b, i = m.group(1), int(m.group(2))
        return _mlp_sources(f"blocks.{b}.moe.experts.{local_experts[i]}",
                            m.group(3) == "linear_fc1", shape[0], None)
    if m := _MC_SHARED.match(key):
        return _mlp_sources(f"blocks.{m.group(1)}.moe.shared_experts", m.group(2) == "linear_fc1",
                            shape[0], None)
    return [(key, None, None)]


def _mlp_sources(prefix: str, fc1: bool, rows: int, index: int | None):
    if not fc1:
        return [(f"{prefix}.down_proj.weight", index, None)]
    f = rows // 2
    return [(f"{prefix}.gate_proj.weight", index, (0, f)), (f"{prefix}.up_proj.weight", index, (f, rows))]


def is_dice_layout(keys) -> bool:
    """True if the key names are dice_ds's (megatron) layout rather than the released one."""
    return any(k.endswith(".moe.router.weight") or ".experts.local_experts." in k
               or k.endswith(".moe.experts.fc1_weight") for k in keys)


def released_view(shapes: dict[str, Sequence[int]], expert_ids: Sequence[int] | None = None
                  ) -> dict[str, tuple[str, int | None, tuple[int, int] | None]]:
    """Released name -> region of a checkpoint tensor, for a checkpoint with these key shapes.

    A released-layout checkpoint maps every key to itself. A dice_ds-layout one (either experts
    layout) is mapped by name only (no tensor is read): ``expert_ids`` gives the global id of each
    of its local experts (default: local index = global id), as :func:`mcore_to_released`.
    """
    out: dict[str, tuple[str, int | None, tuple[int, int] | None]] = {}
    gid = (lambda i: i) if expert_ids is None else (lambda i: expert_ids[i])
    for key, shape in shapes.items():
        if key.endswith("._extra_state"):
            continue
        if m := _MC_EXPERT.match(key):
            _mlp_regions(out, f"blocks.{m.group(1)}.moe.experts.{gid(int(m.group(2)))}",
                         m.group(3) == "linear_fc1", key, shape[0], None)
        elif m := _MC_GROUPED.match(key):
            for i in range(shape[0]):
                _mlp_regions(out, f"blocks.{m.group(1)}.moe.experts.{gid(i)}",
                             m.group(2) == "fc1_weight", key, shape[1], i)
        elif m := _MC_SHARED.match(key):
            _mlp_regions(out, f"blocks.{m.group(1)}.moe.shared_experts",
                         m.group(2) == "linear_fc1", key, shape[0], None)
        elif m := _MC_ROUTER.match(key):
            out[f"blocks.{m.group(1)}.moe.gate.weight"] = (key, None, None)
        else:
            out[key] = (key, None, None)
    return out


def _mlp_regions(out: dict, prefix: str, fc1: bool, key: str, rows: int, index: int | None) -> None:
    if not fc1:
        out[f"{prefix}.down_proj.weight"] = (key, index, None)
        return
    f = rows // 2
    out[f"{prefix}.gate_proj.weight"] = (key, index, (0, f))
    out[f"{prefix}.up_proj.weight"] = (key, index, (f, rows))
