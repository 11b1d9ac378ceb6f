"""The frozen per-call schedule: for every (step, layer), what each parallel runtime does, what a
call computes and returns, and what each layer holds across steps. The one decider.

Owns the schedule's rules (pure functions of their arguments, table-tested in
tests/unit/test_policy.py: ``sync_steps``, ``async_layer_indices``, ``ring_predecessor``,
``is_skip_step``, ``step_skips``, ``exchanges_kept_after_sync``, ``sp_sync_steps``,
``stale_source``, ``stale_output_age``), the step-independent ``Layout`` of a plan's MoE layers
(mode, async layers, ring, what a sync call keeps) and ``Schedule``: built once per call by
``Schedule.build(plan, num_steps, depth)`` (the pipeline builds it: it knows the step count, and
hands it to every runtime through ``runtime.batch(schedule)``), then only queried. Nothing else
derives these answers; the dispatchers (dice_ds/moe/dispatcher.py), the EP and SP runtimes, the
plan's simulator and memory column (dice_ds/plan/sim.py, memory.py) and the tuner's quality model
(dice_ds/tune/quality.py) read them, so a rule changed here changes all of them
(tests/unit/test_schedule.py changes one and checks).

Queries:
- expert parallelism: is step i a sync step (``ep_sync_step``), is (i, l) stale (``ep_stale``),
  does (i, l) skip a slot (``skips``; conditional communication), what a call computes and returns
  (``call(i, l)`` -> ``Call``: the step and layer whose tokens its experts compute, the step whose
  expert outputs of its own tokens it returns and their age, the step whose call computed them),
  which fresh exchanges a sync call of layer l leaves for the next async step
  (``keeps_after_sync``) and what layer l holds across steps (``holds`` -> ``Held``);
- sequence parallelism: is step i a synchronous K/V step (``sp_sync_step``: always for sync SP;
  for displaced SP the first step of a batch and rev 1..sp_warmup, where the K/V cache is
  cleared) and whether the cache is cleared before step i (``sp_clears_cache``).

Conventions (spec §0, §2.3): the step index i counts DOWN from S (``num_steps``) to 1,
rev = S - i (rev 0 is the first step); layers are 0-based block / MoE layer indices 0 <= l < L
(one attention and one MoE layer per block); ``async_layers`` names the layers that run async
(the reference's ``--ep-async-mode``; 'shallow' async == the paper's "deep sync").
``to_json()`` is the plain-data form for run.json.

Invariants:
- the first step (i = S) is always a sync step: the stale modes have no previous step to return;
- cool-down works on its own (the reference ignores it unless warm-up or strided sync is set,
  spec pitfall 4);
- the first step never skips: a skipped slot is filled from the layer's slot cache of the last
  full exchange, and there is none yet. Every later step the period names skips, sync steps and
  sync layers included (spec §2.5: the mechanism also applies to sync layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Union

from dice_ds.ds_config import ASYNC_LAYER_SETS

AsyncLayersSpec = Union[str, tuple[int, ...], list[int]]

NAMED_LAYER_SETS = ASYNC_LAYER_SETS  # the settings tree's list (dice_ds/ds_config.py)
EP_MODES = ("sync", "displaced", "interweaved")


# -- rules ------------------------------------------------------------------------------------------
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


def step_skips(step: int, num_steps: int, plan) -> bool:
    """True iff ``step`` skips one slot per token in every MoE layer: EP is enabled,
    ``is_skip_step`` names the step, and it is not the first step (no slot cache yet).
    ``plan`` is a ``ParallelPlan`` (dice_ds/parallel/plan.py), as in ``Layout.of`` and
    ``Schedule.build``: read, not imported, since the parallel runtimes import this module."""
    if not plan.ep_enabled or not is_skip_step(step, plan.skip_period):
        return False
    return step != num_steps


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
    raise ValueError(f"mode={mode!r}: use one of {EP_MODES}")


def stale_source(mode: str, step: int, layer: int, predecessor: int) -> tuple[int, int]:
    """(step, layer) whose tokens a stale call of ``layer`` at ``step`` computes (its experts run
    on that exchange): displaced, this layer's dispatch of the previous step; interweaved, the
    ring predecessor's dispatch of this step, or of the previous step for the ring head (whose
    predecessor, the tail, ran last step)."""
    if mode == "displaced":
        return step + 1, layer
    if mode == "interweaved":
        return (step + 1 if predecessor >= layer else step), predecessor
    raise ValueError(f"mode={mode!r}: only displaced and interweaved calls are stale")


def stale_output_age(mode: str, after_sync: bool) -> int:
    """How many steps old the expert outputs of its own tokens are that a stale call returns:
    displaced 2 (the combine launched last step, of the tokens of the step before), 1 right
    after a sync step (the combine that sync call kept); interweaved 1 (its ring successor
    computed this layer's tokens of the previous step)."""
    if mode == "displaced":
        return 1 if after_sync else 2
    if mode == "interweaved":
        return 1
    raise ValueError(f"mode={mode!r}: only displaced and interweaved calls are stale")


def sp_sync_steps(num_steps: int, warmup: int = 0) -> frozenset[int]:
    """Steps on which displaced SP gathers every layer's K/V synchronously (exact attention).

    The SP K/V cache is cleared at the start of every batch (rev 0: nothing to be stale from) and
    at rev 1..warmup, so those steps are sync: rev = 0..warmup, i.e. ``sync_steps(S, warmup)``.
    """
    return sync_steps(num_steps, warmup=warmup)


# -- answers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The step-independent part of a plan's EP schedule: which layers run stale and how."""

    ep_mode: str
    """'sync', 'displaced' or 'interweaved' (as executed: 'sync' when nothing is stale)."""
    async_layers: tuple[int, ...]
    """MoE layers that run stale on non-sync steps (empty when nothing is stale)."""
    ring: tuple[int, ...]
    """ring[l]: the layer whose tokens layer l's stale call computes (interweaved ring
    predecessor; l itself for displaced and sync layers)."""
    keeps: tuple[tuple[bool, bool], ...]
    """keeps[l] = (dispatch, combine) a sync call of layer l leaves for the next async step."""

    @classmethod
    def of(cls, plan, depth: int) -> "Layout":
        stale = plan.async_enabled
        async_layers = async_layer_indices(plan.async_layers, depth) if stale else ()
        mode = plan.mode if stale else "sync"
        ring = tuple(ring_predecessor(l, async_layers)
                     if mode == "interweaved" and l in async_layers else l for l in range(depth))
        keeps = tuple(exchanges_kept_after_sync(mode, l, async_layers) for l in range(depth))
        return cls(mode, tuple(async_layers), ring, keeps)


@dataclass(frozen=True)
class Call:
    """What one MoE layer call uses and returns (``Schedule.call``)."""

    step: int
    layer: int
    stale: bool
    computes: tuple[int, int]
    """(step, layer) whose tokens this call's experts compute ((step, layer) for a sync call)."""
    returns: int
    """The step whose tokens (of this layer) the returned expert outputs belong to."""
    computed_at: int
    """The step of the call that computed the returned outputs: ``step`` for a sync call or when
    they were computed earlier in this step; a sync step when a sync call kept them."""
    own_work: bool
    """The returned outputs are the ones this very call computes (a ring of one): the call posts
    its combine and then waits on it; otherwise it takes its held combine before posting."""
    overlap: bool = False
    """A sync call run as two micro-batches (the token halves: CFG's conditional and
    unconditional images when guided), one's exchange in flight while the other's experts compute
    (``ParallelPlan.ep_overlap``). Fresh outputs; what it keeps is what a one-batch call keeps."""

    @property
    def age(self) -> int:
        """How many steps old the returned outputs' tokens are (0 for a sync call)."""
        return self.returns - self.step


@dataclass(frozen=True)
class Held:
    """What one layer holds: how many steps' worth of each exchange its state keeps at once.

    ``dispatch``: its received tokens kept across a step boundary for a later call (every
    displaced layer; the interweaved ring tail, whose dispatch the head computes next step: at
    most one dispatch is ever in flight between the other ring layers, and it is that one);
    ``combine``: its returned expert outputs held in its slot between the call that computed
    them and its own call (every stale layer whose outputs another call computes)."""

    dispatch: int = 0
    combine: int = 0


@dataclass(frozen=True)
class Schedule:
    """Every per-(step, layer) decision of one call; immutable."""

    num_steps: int
    depth: int
    ep_mode: str
    """'sync', 'displaced' or 'interweaved' (as executed: 'sync' when EP is off)."""
    ep_sync_steps: frozenset[int]
    """Steps on which every MoE layer runs a fresh (sync) exchange; every step when none is stale."""
    async_layers: tuple[int, ...]
    """MoE layers that run stale on the other steps (empty when nothing is stale)."""
    ring: tuple[int, ...]
    """ring[l]: the layer whose tokens layer l's stale call computes (``Layout.ring``)."""
    keeps: tuple[tuple[bool, bool], ...]
    """keeps[l] = (dispatch, combine) a sync call of layer l leaves for the next async step."""
    skip_steps: frozenset[int]
    """Steps on which every MoE layer skips one slot per token (conditional communication)."""
    sp_size: int
    sp_async: bool
    sp_sync_steps: frozenset[int]
    """Steps on which attention gathers every rank's fresh K/V (all steps for sync SP)."""
    ep_overlap: bool = False
    """Every sync EP call is overlapped (``Call.overlap``)."""

    @classmethod
    def build(cls, plan, num_steps: int, depth: int) -> "Schedule":
        """The schedule of ``plan`` (a ``ParallelPlan``) for ``num_steps`` steps and ``depth``
        layers."""
        steps = frozenset(range(1, num_steps + 1))
        layout = Layout.of(plan, depth)
        stale = layout.ep_mode != "sync"
        sp_async = bool(plan.sp_async and plan.sp_enabled)
        return cls(
            num_steps=num_steps,
            depth=depth,
            ep_mode=layout.ep_mode,
            ep_sync_steps=(sync_steps(num_steps, plan.warmup, plan.cooldown, plan.strided)
                           if stale else steps),
            async_layers=layout.async_layers,
            ring=layout.ring,
            keeps=layout.keeps,
            skip_steps=frozenset(i for i in steps if step_skips(i, num_steps, plan)),
            sp_size=plan.sp_size,
            sp_async=sp_async,
            sp_sync_steps=sp_sync_steps(num_steps, plan.sp_warmup) if sp_async else steps,
            ep_overlap=plan.ep_enabled and plan.ep_overlap,
        )

    @property
    def layout(self) -> Layout:
        return Layout(self.ep_mode, self.async_layers, self.ring, self.keeps)

    # -- queries -----------------------------------------------------------------------------
    def _check(self, step: int, layer: int | None = None) -> None:
        if not 1 <= step <= self.num_steps:
            raise ValueError(f"step {step} outside [1, {self.num_steps}]")
        if layer is not None and not 0 <= layer < self.depth:
            raise ValueError(f"layer {layer} outside [0, {self.depth})")

    def ep_sync_step(self, step: int) -> bool:
        self._check(step)
        return step in self.ep_sync_steps

    def ep_stale(self, step: int, layer: int) -> bool:
        """True iff MoE layer ``layer`` runs a stale (displaced / interweaved) call at ``step``."""
        self._check(step, layer)
        return step not in self.ep_sync_steps and layer in self.async_layers

    def skips(self, step: int, layer: int) -> bool:
        """True iff MoE layer ``layer`` skips one slot per token at ``step`` (every layer alike)."""
        self._check(step, layer)
        return step in self.skip_steps

    def ring_source(self, layer: int) -> int:
        self._check(1, layer)
        return self.ring[layer]

    def keeps_after_sync(self, layer: int) -> tuple[bool, bool]:
        self._check(1, layer)
        return self.keeps[layer]

    def _computes(self, step: int, layer: int) -> tuple[int, int]:
        if not self.ep_stale(step, layer):
            return step, layer
        return stale_source(self.ep_mode, step, layer, self.ring[layer])

    @cached_property
    def _successors(self) -> tuple[tuple[int, ...], ...]:
        """_successors[l]: the async layers whose stale calls compute layer l's tokens."""
        return tuple(tuple(q for q in self.async_layers if self.ring[q] == l)
                     for l in range(self.depth))

    def _computed_at(self, tokens_step: int, layer: int, before: int) -> int:
        """The step of the call (at ``before`` before this layer, or at an earlier step) whose
        experts computed layer ``layer``'s tokens of ``tokens_step``, and whose outputs that
        layer reads."""
        if tokens_step in self.ep_sync_steps and self.keeps[layer][1] \
                and before == tokens_step - 1:
            return tokens_step  # the first call after a sync step: the combine the sync call kept
        for step in range(before, min(tokens_step, self.num_steps) + 1):
            for q in self._successors[layer]:
                if (step > before or q <= layer) and self.ep_stale(step, q) \
                        and self._computes(step, q) == (tokens_step, layer):
                    return step
        raise ValueError(f"schedule: layer {layer} at step {before} returns the outputs of step "
                         f"{tokens_step}, which no call computes (rules stale_source / "
                         "stale_output_age disagree)")

    def call(self, step: int, layer: int) -> Call:
        """What MoE layer ``layer`` computes and returns at ``step`` (``Call``)."""
        self._check(step, layer)
        if not self.ep_stale(step, layer):
            return Call(step, layer, False, (step, layer), step, step, True, self.ep_overlap)
        computes = self._computes(step, layer)
        after_sync = step + 1 in self.ep_sync_steps
        returns = step + stale_output_age(self.ep_mode, after_sync)
        computed_at = self._computed_at(returns, layer, step)
        own = computed_at == step and computes == (returns, layer)
        return Call(step, layer, True, computes, returns, computed_at, own)

    def holds(self, layer: int) -> Held:
        """What ``layer`` holds (``Held``), the most at once over this schedule's steps."""
        self._check(1, layer)
        return self._held[layer]

    @cached_property
    def _held(self) -> tuple[Held, ...]:
        S, L = self.num_steps, self.depth
        # [layer][b]: exchanges held across the boundary between steps b and b - 1
        dispatch = [[0] * (S + 2) for _ in range(L)]
        combine = [[0] * (S + 2) for _ in range(L)]
        within = [0] * L
        for step in range(1, S + 1):
            for q in self.async_layers:
                c = self.call(step, q)
                if not c.stale:
                    continue
                (src_step, src), fill = c.computes, combine[q]
                for b in range(step + 1, src_step + 1):
                    dispatch[src][b] += 1
                if not c.own_work:
                    within[q] = 1
                    for b in range(step + 1, c.computed_at + 1):
                        fill[b] += 1
        return tuple(Held(max(dispatch[l]), max(max(combine[l]), within[l])) for l in range(L))

    def sp_sync_step(self, step: int) -> bool:
        """True iff attention uses every rank's fresh K/V at ``step`` (blocking gather)."""
        self._check(step)
        return step in self.sp_sync_steps

    def sp_clears_cache(self, step: int) -> bool:
        """Displaced SP: the K/V cache is emptied before ``step`` (the first step of a batch and
        rev 1..sp_warmup); never for sync SP, which holds no cache."""
        self._check(step)
        return self.sp_async and step in self.sp_sync_steps

    def to_json(self) -> dict:
        """Plain JSON-able data; steps descending."""
        def desc(steps):
            return sorted(steps, reverse=True)

        return {
            "num_steps": self.num_steps,
            "depth": self.depth,
            "ep_mode": self.ep_mode,
            "ep_sync_steps": desc(self.ep_sync_steps),
            "async_layers": list(self.async_layers),
            "ring": {str(l): self.ring[l] for l in self.async_layers}
            if self.ep_mode == "interweaved" else {},
            "keeps_after_sync": {str(l): list(self.keeps[l]) for l in self.async_layers},
            "skip_steps": desc(self.skip_steps),
            "sp_size": self.sp_size,
            "sp_async": self.sp_async,
            "sp_sync_steps": desc(self.sp_sync_steps) if self.sp_size > 1 else [],
            "ep_overlap": self.ep_overlap,
        }
