"""DICE schedules as pure functions: which steps are synchronous, which layers run async, the
interweaved ring, and which steps skip a slot (conditional communication).

Owns every decision of the form "is (step, layer) sync / async / skipping?" so no layer forward
compares mode strings. Nothing here touches torch.distributed or a device; every function is a pure
function of its arguments and is table-tested (tests/unit/test_policy.py).

Conventions (spec §0, §2.3):
- the sampler's step index ``i`` counts DOWN from S (``num_steps``) to 1; ``rev = S - i``, rev 0 is
  the first step;
- layers are 0-based MoE layer indices ``0 <= l < depth`` (L = depth);
- ``async_layers`` names the layers that run async (the reference's ``--ep-async-mode``); the
  paper's names say which layers stay sync ('shallow' async == the paper's "deep sync").

Invariants:
- the first step (i = S) is always a sync step: the stale modes have no previous step to return;
- cool-down works on its own (the reference ignores it unless warm-up or strided sync is set,
  spec pitfall 4);
- the first step never skips: a skipped slot is filled from the layer's slot cache of the last full
  exchange, and there is none yet. Every later step the period names skips, sync steps and sync
  layers included (spec §2.5: the mechanism also applies to sync layers); this is the schedule the
  runtime (``dice_ds.moe.runtime``) realises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from dice_ds.parallel.plan import ParallelPlan

AsyncLayersSpec = Union[str, tuple[int, ...], list[int]]

NAMED_LAYER_SETS = ("all", "shallow", "deep", "interleaved")


def sync_steps(num_steps: int, warmup: int = 0, cooldown: int = 0,
               strided: int = 0) -> frozenset[int]:
    """Steps i in [1, S] on which every layer runs synchronous EP.

    Union of: the first step (i = S); warm-up steps rev = 0..warmup; strided steps
    (i % strided == 0 when strided > 0); cool-down steps (i <= cooldown).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    for name, value in (("warmup", warmup), ("cooldown", cooldown), ("strided", strided)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    steps = {num_steps}
    steps.update(num_steps - rev for rev in range(min(warmup, num_steps - 1) + 1))
    if strided > 0:
        steps.update(i for i in range(1, num_steps + 1) if i % strided == 0)
    steps.update(range(1, min(cooldown, num_steps) + 1))
    return frozenset(steps)


def async_layer_indices(async_layers: AsyncLayersSpec, depth: int) -> tuple[int, ...]:
    """The sorted MoE layer indices that run async.

    'all': every layer; 'shallow': l < L/2; 'deep': l >= L/2; 'interleaved': even l; or an
    explicit sequence of indices (validated: in range, no duplicates, not empty).
    """
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    half = depth // 2
    if isinstance(async_layers, str):
        table = {
            "all": range(depth),
            "shallow": range(half),
            "deep": range(half, depth),
            "interleaved": range(0, depth, 2),
        }
        if async_layers not in table:
            raise ValueError(f"async_layers={async_layers!r}: use one of {NAMED_LAYER_SETS} or a "
                             "tuple of layer indices")
        layers = tuple(table[async_layers])
        if not layers:
            raise ValueError(f"async_layers={async_layers!r} selects no layer at depth {depth}")
        return layers
    layers = tuple(int(layer) for layer in async_layers)
    if not layers:
        raise ValueError("async_layers: an explicit layer list must not be empty")
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad:
        raise ValueError(f"async_layers: indices {bad} are outside [0, {depth})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"async_layers: duplicate indices in {layers}")
    return tuple(sorted(layers))


def ring_predecessor(layer: int, async_layer_indices: tuple[int, ...]) -> int:
    """past(l): the previous async layer in the interweaved ring, cyclic.

    The first async layer's predecessor is the last one (it consumes what the last async layer
    launched in the previous step). A ring of one layer is its own predecessor.
    """
    ring = tuple(async_layer_indices)
    if layer not in ring:
        raise ValueError(f"layer {layer} is not an async layer {ring}")
    pos = ring.index(layer)
    return ring[pos - 1]


def layer_is_async(step: int, num_steps: int, layer: int, plan: "ParallelPlan", depth: int) -> bool:
    """True iff MoE layer ``layer`` runs a stale (displaced / interweaved) exchange at ``step``."""
    if plan.mode == "sync" or not plan.ep_enabled:
        return False
    if step in sync_steps(num_steps, plan.warmup, plan.cooldown, plan.strided):
        return False
    return layer in async_layer_indices(plan.async_layers, depth)


def is_skip_step(step: int, skip_period: int) -> bool:
    """Conditional communication: step i skips one slot per token iff P > 1 and P does not divide i.

    This is the setting's literal meaning for every layer (sync or async). The DICE reference
    realises it only on every 4th step for interweaved layers with P = 2 (spec §2.5, pitfall 7); a
    compatibility helper reproducing that emergent schedule is NOT offered: it is a side effect of
    the reference's cache pop/refill order, not a schedule, and it would need the runtime's cache
    state to reproduce. dice_ds skips on the steps the setting names.
    """
    if skip_period < 1:
        raise ValueError(f"skip_period={skip_period} must be >= 1")
    return skip_period > 1 and step % skip_period != 0


def step_skips(step: int, num_steps: int, plan: "ParallelPlan") -> bool:
    """True iff ``step`` skips one slot per token in every MoE layer: EP is enabled,
    ``is_skip_step`` names the step, and it is not the first step (no slot cache yet)."""
    if not plan.ep_enabled or not is_skip_step(step, plan.skip_period):
        return False
    return step != num_steps


def describe_schedule(plan: "ParallelPlan", num_steps: int, depth: int) -> dict:
    """The realised schedule as plain JSON-able data (for run.json and logs).

    Keys: ``sync_steps`` (descending; steps on which every layer runs sync EP, so every step when
    no layer is stale), ``async_layers`` (empty when no layer runs async),
    ``sync_layers``, ``ring`` ({layer: past(layer)}, interweaved only), ``skip_steps``
    (descending), ``num_steps``, ``depth``.
    """
    steps = sync_steps(num_steps, plan.warmup, plan.cooldown, plan.strided)
    stale = plan.mode != "sync" and plan.ep_enabled
    async_layers = async_layer_indices(plan.async_layers, depth) if stale else ()
    ring = ({str(layer): ring_predecessor(layer, async_layers) for layer in async_layers}
            if plan.mode == "interweaved" and stale else {})
    return {
        "num_steps": num_steps,
        "depth": depth,
        "mode": plan.mode,
        "sync_steps": sorted(steps, reverse=True) if stale else list(range(num_steps, 0, -1)),
        "async_layers": list(async_layers),
        "sync_layers": [layer for layer in range(depth) if layer not in async_layers],
        "ring": ring,
        "skip_period": plan.skip_period,
        "skip_strategy": plan.skip_strategy,
        "skip_steps": [i for i in range(num_steps, 0, -1) if step_skips(i, num_steps, plan)],
    }


def exchanges_kept_after_sync(mode: str, layer: int,
                              async_layer_indices: tuple[int, ...]) -> tuple[bool, bool]:
    """(dispatch, combine): which fresh exchanges a SYNC call of ``layer`` leaves for the next
    async step (what the stale dispatchers of dice_ds/moe/dispatcher.py consume).

    Sync layers and sync modes keep nothing. Displaced keeps both (its next async call computes the
    held dispatch and returns the held combine). Interweaved: the ring tail keeps its dispatch (the
    ring head computes it across the step boundary); every other async layer keeps its combine (it
    reads its combine slot before its ring successor writes it).
    """
    ring = tuple(async_layer_indices)
    if mode == "sync" or layer not in ring:
        return False, False
    if mode == "displaced":
        return True, True
    if mode == "interweaved":
        tail = layer == ring[-1]
        return tail, not tail
    raise ValueError(f"mode={mode!r}: use sync, displaced or interweaved")


def sp_sync_steps(num_steps: int, warmup: int = 0) -> frozenset[int]:
    """Steps on which displaced SP gathers every layer's K/V synchronously (exact attention).

    The SP K/V cache is cleared at the start of every batch (rev 0: nothing to be stale from) and
    at rev 1..warmup, so those steps are sync: rev = 0..warmup, i.e. ``sync_steps(S, warmup)``.
    """
    return sync_steps(num_steps, warmup=warmup)
