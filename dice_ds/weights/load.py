"""The streaming load: checkpoint regions straight into a built model's parameters, one at a time.

Owns ``load_into_model(model, source)``, the one path by which weights enter a ``DiTMoE`` (the
source is a ``dice_ds/weights/read.py`` reader, or a state dict, read through ``InMemoryReader``),
plus ``LoadResult``, ``CheckpointMismatchError``, ``local_expert_ids`` / ``layer_expert_ids`` and
``time_plain_read`` (the I/O floor of a load, ``docs/scale.md``). For every model tensor it asks
``dice_ds/weights/keymap.py`` which released
tensors fill which rows of it (``released_sources``) and where each released tensor lives in this
checkpoint (``released_view``: itself, or a region of a dice_ds-layout tensor), checks the whole
plan first (missing, unexpected and wrongly shaped tensors, and integer or bool tensors where the
model has floating weights -- refused, never cast -- one ``CheckpointMismatchError`` naming them
all), then copies region by region with ``reader.read_into``: each routed expert's
``gate_proj`` / ``up_proj`` / ``down_proj`` lands directly in its slice of the grouped weight (or of
its ``linear_fc1``), cast on the way; no mapped state dict, no stack, no second copy. Every
region is refused if it holds NaN/inf as it is read (``dice_ds/weights/read.py``).

Invariants: only this rank's experts are read (the others are counted as dropped): per MoE layer the
logical experts of its local slots (``DiTMoELayer.local_logical_experts``: megatron's contiguous
experts, or those an expert placement gives the rank, replicas included;
``dice_ds/placement.py``); values are bitwise those of a ``load_state_dict`` of the mapped dict
(a copy_ with the same cast); the only tensor ever skipped non-strictly is ``pos_embed`` at another
image size, regenerated with a warning (pitfall 17 in docs/).
"""

from __future__ import annotations

import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dice_ds.config import ConfigError
from dice_ds.hugepages import trim_heap
from dice_ds.models.dit_moe import fill_fixed_tables
from dice_ds.weights.check import listed
from dice_ds.weights.keymap import held_experts, is_dice_layout, released_sources, released_view
from dice_ds.weights.read import CheckpointReader, InMemoryReader, region

_RELEASED_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EXTRA = "._extra_state"


class CheckpointMismatchError(ConfigError):
    """The checkpoint's keys or shapes do not fit the model that was built."""


@dataclass(frozen=True)
class LoadResult:
    """What a load did besides copying matching tensors."""

    local_experts: tuple
    """Global ids of the experts this model holds, in local order: one tuple when every MoE
    layer holds the same experts, else one tuple per layer (an expert placement)."""
    dropped_expert_keys: int = 0
    """Released expert tensors not read because another EP rank owns them."""
    regenerated_pos_embed: bool = False
    missing: tuple[str, ...] = field(default_factory=tuple)
    unexpected: tuple[str, ...] = field(default_factory=tuple)
    """Only non-empty with ``strict=False``."""
    bytes_read: int = 0
    seconds: float = 0.0


def layer_expert_ids(model: torch.nn.Module) -> tuple[tuple[int, ...], ...]:
    """Per MoE layer, the logical (global) expert of each local slot, in local order."""
    return tuple(tuple(_logical(moe)) for moe in model.moe_layers())


def _logical(moe) -> tuple[int, ...]:
    ids = getattr(moe, "local_logical_experts", None)
    return tuple(int(i) for i in (moe.local_expert_indices if ids is None else ids))


def local_expert_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """Global ids of the experts held by every MoE layer of ``model`` (identical for all layers)."""
    ids = set(layer_expert_ids(model))
    if len(ids) != 1:
        raise ValueError(f"MoE layers hold different expert sets: {sorted(ids)}")
    return ids.pop()


def _uniform(per_layer: tuple) -> tuple[int, ...] | None:
    """The one expert tuple of every layer, or None when layers differ."""
    return per_layer[0] if per_layer and len(set(per_layer)) == 1 else None


def _checkpoint_view(reader: CheckpointReader, per_layer: tuple, num_experts: int) -> dict:
    """Released name -> checkpoint region (a dice_ds shard holds this rank's experts in local
    order: the caller saved its own state dict; only a model whose layers hold the same experts
    reads one)."""
    shapes = {k: i.shape for k, i in reader.infos.items()}
    if not is_dice_layout(shapes):
        return {k: (k, None, None) for k in shapes}
    local = _uniform(per_layer) or tuple(range(num_experts))
    shard = len(local) < num_experts and held_experts(shapes) == len(local)
    return released_view(shapes, expert_ids=local if shard else None)


@dataclass
class _Plan:
    copies: list = field(default_factory=list)  # (dest view, checkpoint key, index, rows)
    missing: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    dtypes: list = field(default_factory=list)
    used: set = field(default_factory=set)
    regenerate: bool = False


def _dest_view(t: torch.Tensor, index, rows) -> torch.Tensor:
    if index is not None:
        t = t[index]
    if rows is not None:
        t = t[rows[0]:rows[1]]
    return t


def _block_experts(key: str, per_layer: tuple) -> tuple[int, ...]:
    """The local experts of the block a model key belongs to (any tuple for non-block keys)."""
    m = _BLOCK.match(key)
    return per_layer[int(m.group(1))] if m and int(m.group(1)) < len(per_layer) else ()


def _plan(model, reader: CheckpointReader, view: dict, per_layer: tuple) -> _Plan:
    plan = _Plan()
    for key, param in model.state_dict(keep_vars=True).items():
        if key.endswith(_EXTRA) or not torch.is_tensor(param):
            continue
        if param.is_meta:
            raise RuntimeError(f"{key} is still on the meta device: materialise the model first")
        local = _block_experts(key, per_layer)
        for rkey, d_index, d_rows in released_sources(key, tuple(param.shape), local):
            plan.used.add(rkey)
            if rkey not in view:
                plan.missing.append(rkey)
                continue
            src, s_index, s_rows = view[rkey]
            dest = _dest_view(param.data, d_index, d_rows)
            _, shape = region(reader.infos[src], s_index, s_rows)
            if key == "pos_embed" and len(shape) == 3 and shape[0] == 1 \
                    and shape[2] == dest.shape[2] and shape[1] != dest.shape[1]:
                plan.regenerate = True  # another image size: the model's own table stays
                continue
            if tuple(shape) != tuple(dest.shape):
                plan.shapes.append(f"{rkey}: ckpt {list(shape)} vs model {list(dest.shape)}")
                continue
            src_dtype = reader.infos[src].dtype
            if dest.is_floating_point() and not src_dtype.is_floating_point:
                plan.dtypes.append(f"{src} is {str(src_dtype).replace('torch.', '')}")
                continue
            plan.copies.append((dest, src, s_index, s_rows))
    return plan


def _unexpected_and_dropped(view: dict, used: set, per_layer: tuple, num_experts: int):
    unexpected, dropped = [], 0
    for rkey in view:
        if rkey in used:
            continue
        m = _RELEASED_EXPERT.match(rkey)
        if m and int(m.group(2)) < num_experts \
                and int(m.group(2)) not in _block_experts(rkey, per_layer):
            dropped += 1  # another EP rank's expert: never read
        else:
            unexpected.append(rkey)
    return sorted(unexpected), dropped


def _check(plan: _Plan, unexpected: list, strict: bool, name: str) -> list[str]:
    missing = sorted(set(plan.missing))
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing: {listed(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected: {listed(unexpected)}")
    if plan.shapes:
        problems.append(f"{len(plan.shapes)} shape mismatch: {listed(sorted(plan.shapes))}")
    if plan.dtypes:
        problems.append(f"{len(plan.dtypes)} non-floating tensor(s) where the model has floating "
                        f"weights (not cast): {listed(sorted(set(plan.dtypes)))}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint does not match --model {name} (check --ckpt and "
                                      f"--model): " + "; ".join(problems))
    return missing


@torch.no_grad()
def load_into_model(model, source: CheckpointReader | dict[str, torch.Tensor], strict: bool = True,
                    progress: bool = False) -> LoadResult:
    """Fill ``model`` (a materialised ``DiTMoE``) from ``source`` (a reader, or a state dict in
    released or dice_ds layout), in place, region by region (module doc).

    Each MoE layer receives only the experts of its local slots (``local_logical_experts``); the
    others are never read. Raises ``CheckpointMismatchError`` naming every missing (``strict``), unexpected
    (``strict``) or wrongly shaped tensor before anything is copied. A ``pos_embed`` for another
    image size is replaced by the model's own table, with a warning. ``progress``: a byte progress
    bar on stderr.
    """
    reader = source if isinstance(source, CheckpointReader) else InMemoryReader(source)
    t0 = time.perf_counter()
    per_layer, n_experts = layer_expert_ids(model), model.cfg.num_experts
    view = _checkpoint_view(reader, per_layer, n_experts)
    plan = _plan(model, reader, view, per_layer)
    unexpected, dropped = _unexpected_and_dropped(view, plan.used, per_layer, n_experts)
    missing = _check(plan, unexpected, strict, model.cfg.name)
    if plan.regenerate:
        theirs = reader.infos[view["pos_embed"][0]].shape[1]
        warnings.warn(f"checkpoint pos_embed has {theirs} tokens, the model {model.cfg.num_tokens} "
                      "(another image size): pos_embed regenerated; the weights were trained at the "
                      "checkpoint's size, so outputs are for performance testing only", stacklevel=2)
        fill_fixed_tables(model)
    before = reader.bytes_read
    bar = _bar(sum(reader.nbytes(s, i, r) for _, s, i, r in plan.copies), progress)
    try:
        _copy_pipelined(reader, plan.copies, bar)
    finally:
        reader.release_scratch()
        trim_heap()  # the scratch slots may sit in a heap arena (dice_ds/hugepages.py)
        if bar is not None:
            bar.close()
    if missing or unexpected:
        warnings.warn(f"non-strict checkpoint load: {len(missing)} missing "
                      f"({listed(missing)}), {len(unexpected)} unexpected ({listed(unexpected)})",
                      stacklevel=2)
    return LoadResult(local_experts=_uniform(per_layer) or per_layer, dropped_expert_keys=dropped,
                      regenerated_pos_embed=plan.regenerate, missing=tuple(missing),
                      unexpected=tuple(unexpected), bytes_read=reader.bytes_read - before,
                      seconds=time.perf_counter() - t0)


CHUNK_BYTES = 8 << 20
"""A region that must be cast is read and cast in pieces of at most this many source bytes."""


def _parts(reader: CheckpointReader, copies: list, chunk_bytes: int):
    """(flat destination piece, checkpoint key, first source element) for every copy: whole
    regions where the bytes land in the parameter directly, ``chunk_bytes`` pieces where a cast
    goes through a scratch slot."""
    for dest, src, index, rows in copies:
        info = reader.infos[src]
        start, _ = region(info, index, rows)
        flat = dest.view(-1)  # parameters and their leading-dim slices are contiguous
        direct = dest.device.type == "cpu" and dest.dtype == info.dtype
        step = flat.numel() if direct else max(1, chunk_bytes // info.dtype.itemsize)
        for off in range(0, flat.numel(), max(step, 1)):
            yield flat[off:off + step], src, start + off


def _copy_pipelined(reader: CheckpointReader, copies: list, bar) -> None:
    """Each piece read by a worker thread into one of two scratch slots while this thread casts
    the previous one into its parameter (``pread`` and ``copy_`` both release the GIL): a cast
    load costs about max(read, cast) instead of their sum, with 2 x ``CHUNK_BYTES`` of scratch."""
    parts = list(_parts(reader, copies, CHUNK_BYTES))
    if not parts:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="dice-ds-read") as pool:
        def submit(i):
            dest, src, start = parts[i]
            return pool.submit(reader.stage_part, src, dest, start, i % 2)

        ahead = submit(0)
        for i, (dest, src, _) in enumerate(parts):
            staged = ahead.result()
            if i + 1 < len(parts):
                ahead = submit(i + 1)
            reader.commit(staged, dest, src)
            if bar is not None:
                bar.update(dest.numel() * reader.infos[src].dtype.itemsize)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights",
                dynamic_ncols=True, leave=False)


def time_plain_read(model, reader: CheckpointReader) -> dict:
    """Read exactly the regions a load of ``model`` reads, without casting or copying: the I/O
    floor a load is compared with (``docs/scale.md``). The bytes go round-robin into the memory of
    the model's largest parameter (already resident, about to be overwritten by the load, and
    larger than any CPU cache), so the measurement neither adds to the peak nor writes into a
    cache-resident scratch. Returns bytes and seconds."""
    per_layer = layer_expert_ids(model)
    view = _checkpoint_view(reader, per_layer, model.cfg.num_experts)
    copies = _plan(model, reader, view, per_layer).copies
    sizes = [reader.nbytes(s, i, r) for _, s, i, r in copies]
    big = max(model.parameters(), key=lambda p: p.numel() * p.element_size()).data
    ring = big.reshape(-1).view(torch.uint8) if big.device.type == "cpu" else None
    if ring is None or ring.numel() < max(sizes, default=0):
        ring = torch.empty(max(sizes, default=0), dtype=torch.uint8)
    before, t0, at = reader.bytes_read, time.perf_counter(), 0
    check, reader.check_finite = reader.check_finite, False  # the floor: I/O alone
    try:
        for (dest, src, index, rows), n in zip(copies, sizes):
            at = 0 if at + n > ring.numel() else at
            dtype = reader.infos[src].dtype
            reader.read_into(src, ring[at:at + n].view(dtype).view(dest.shape), index, rows)
            at += n
    finally:
        reader.check_finite = check
    return {"bytes": reader.bytes_read - before, "seconds": time.perf_counter() - t0}
