"""The one key map between released DiT-MoE names (spec §1.3) and dice_ds's megatron layout.

Owns ``released_sources(key, shape, local_experts)``: for one tensor of the model, which released
tensors fill which region of it. Everything else here is derived from it, never written a second
time: ``released_view`` (the inverse, by name: where each released tensor lives in a checkpoint
saved in either layout) and ``mcore_to_released`` (that inverse applied to tensors: a model's state
dict under released names, for export and for the completeness check). Non-MoE keys keep their
released name.

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
are stacked along a leading dim, in local order:

| released (per block b, local experts e_0..e_{L-1})  | dice_ds grouped layout                                    |
|-----------------------------------------------------|-----------------------------------------------------------|
| ``blocks.b.moe.experts.e_i.{gate,up}_proj.weight``   | ``blocks.b.moe.experts.fc1_weight[i]`` = cat(gate, up)    |
| ``blocks.b.moe.experts.e_i.down_proj.weight``        | ``blocks.b.moe.experts.fc2_weight[i]``                    |

A region is (index along dim 0 or None, (row lo, row hi) of the next dim or None): for a contiguous
tensor one contiguous byte range, so the loader (``dice_ds/weights/load.py``) copies each released
tensor straight into its place and never builds a mapped state dict.

Invariants: pure functions of names and shapes (no file, no process group); ``torch`` only for
slicing in ``mcore_to_released``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_MC_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_MC_SHARED = re.compile(r"^blocks\.(\d+)\.moe\.shared_experts\.(linear_fc1|linear_fc2)\.weight$")
_MC_GROUPED = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(fc1_weight|fc2_weight)$")
_MC_ROUTER = re.compile(r"^blocks\.(\d+)\.moe\.router\.weight$")
_EXTRA = "._extra_state"


def released_sources(key: str, shape: Sequence[int], local_experts: Sequence[int]
                     ) -> list[tuple[str, int | None, tuple[int, int] | None]]:
    """What fills model tensor ``key`` (shape ``shape``): [(released key, dest index, dest rows)].

    ``local_experts`` are the global ids of the model's experts in local order (at least as many
    as the tensor holds). Either experts layout; non-MoE keys map to themselves.
    """
    if m := _MC_ROUTER.match(key):
        return [(f"blocks.{m.group(1)}.moe.gate.weight", None, None)]
    if m := _MC_GROUPED.match(key):
        b, fc1 = m.group(1), m.group(2) == "fc1_weight"
        out = []
        for i in range(shape[0]):
            out += _mlp_sources(f"blocks.{b}.moe.experts.{local_experts[i]}", fc1, shape[1], i)
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


def held_experts(shapes: dict[str, Sequence[int]]) -> int:
    """How many experts per layer a dice_ds-layout state dict holds (0 for the released layout)."""
    n = 0
    for key, shape in shapes.items():
        if m := _MC_GROUPED.match(key):
            n = max(n, shape[0])
        elif m := _MC_EXPERT.match(key):
            n = max(n, int(m.group(2)) + 1)
    return n


def released_view(shapes: dict[str, Sequence[int]], expert_ids: Sequence[int] | None = None
                  ) -> dict[str, tuple[str, int | None, tuple[int, int] | None]]:
    """Released name -> (checkpoint key, region) for a checkpoint with these key shapes.

    The inverse of :func:`released_sources` over the checkpoint's own keys: a released-layout
    checkpoint maps every key to itself; a dice_ds-layout one (either experts layout) is mapped by
    name only (no tensor is read). ``expert_ids`` gives the global id of each of its local experts
    (default: local index = global id). ``_extra_state`` entries are skipped.
    """
    ids = range(held_experts(shapes)) if expert_ids is None else expert_ids
    out: dict[str, tuple[str, int | None, tuple[int, int] | None]] = {}
    for key, shape in shapes.items():
        if key.endswith(_EXTRA):
            continue
        for rkey, index, rows in released_sources(key, shape, ids):
            out[rkey] = (key, index, rows)
    return out


def mcore_to_released(sd: dict[str, torch.Tensor], expert_ids: Sequence[int] | None = None
                      ) -> dict[str, torch.Tensor]:
    """``sd`` (dice_ds layout, either experts layout) under released names: :func:`released_view`
    applied to the tensors. ``expert_ids``: the global id of each local expert, in local order
    (default: local index = global id). A part of a larger tensor is cloned (no shared storage in
    an export); a whole tensor is passed through."""
    shapes = {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}
    out: dict[str, torch.Tensor] = {}
    for rkey, (key, index, rows) in released_view(shapes, expert_ids).items():
        value = sd[key]
        if index is not None:
            value = value[index]
        if rows is not None:
            value = value[rows[0]:rows[1]]
        out[rkey] = value.clone() if (index, rows) != (None, None) else value
    return out
