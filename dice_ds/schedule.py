"""The frozen per-run schedule: for every (step, layer), what each parallel runtime does.

Owns ``Schedule``: built once per (plan, num_steps, depth) by ``Schedule.build`` from the pure,
table-tested functions of ``dice_ds.moe.policy``, then only queried. Runtimes ask it instead of
re-deriving decisions from the plan:

- expert parallelism: is step i a sync step (``ep_sync_step``), is (i, l) stale (``ep_stale``),
  does (i, l) skip a slot (``skips``; conditional communication), whose tokens does layer l compute
  (``ring_source``: the interweaved ring predecessor, else l itself), and which fresh exchanges a
  sync call of layer l leaves for the next async step (``keeps_after_sync``);
- sequence parallelism: is step i a synchronous K/V step (``sp_sync_step``: always for sync SP;
  for displaced SP the first step of a batch and rev 1..sp_warmup, where the K/V cache is
  cleared) and whether the cache is cleared before step i (``sp_clears_cache``).

Conventions: i counts down S..1 (rev = S - i); layers are 0-based block / MoE layer indices
(one attention and one MoE layer per block). ``to_json()`` is the plain-data form for run.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from dice_ds.moe import policy


@dataclass(frozen=True)
class Schedule:
    """Every per-(step, layer) decision of one run; immutable."""

    num_steps: int
    depth: int
    ep_mode: str
    """'sync', 'displaced' or 'interweaved' (as executed: 'sync' when EP is off)."""
    ep_sync_steps: frozenset[int]
    """Steps on which every MoE layer runs a fresh (sync) exchange; every step when none is stale."""
    async_layers: tuple[int, ...]
    """MoE layers that run stale on the other steps (empty when nothing is stale)."""
    ring: tuple[int, ...]
    """ring[l]: the layer whose tokens layer l's stale call computes (interweaved ring
    predecessor; l itself for displaced and sync layers)."""
    keeps: tuple[tuple[bool, bool], ...]
    """keeps[l] = (dispatch, combine) a sync call of layer l leaves for the next async step."""
    skip_steps: frozenset[int]
    """Steps on which every MoE layer skips one slot per token (conditional communication)."""
    sp_size: int
    sp_async: bool
    sp_sync_steps: frozenset[int]
    """Steps on which attention gathers every rank's fresh K/V (all steps for sync SP)."""

    @classmethod
    def build(cls, plan, num_steps: int, depth: int) -> "Schedule":
        """The schedule of ``plan`` (a ``ParallelPlan``) for ``num_steps`` steps and ``depth``
        layers."""
        steps = frozenset(range(1, num_steps + 1))
        stale = plan.async_enabled
        async_layers = policy.async_layer_indices(plan.async_layers, depth) if stale else ()
        mode = plan.mode if stale else "sync"
        ring = tuple(policy.ring_predecessor(l, async_layers)
                     if mode == "interweaved" and l in async_layers else l for l in range(depth))
        sp_async = bool(plan.sp_async and plan.sp_enabled)
        return cls(
            num_steps=num_steps,
            depth=depth,
            ep_mode=mode,
            ep_sync_steps=(policy.sync_steps(num_steps, plan.warmup, plan.cooldown, plan.strided)
                           if stale else steps),
            async_layers=tuple(async_layers),
            ring=ring,
            keeps=tuple(policy.exchanges_kept_after_sync(mode, l, async_layers)
                        for l in range(depth)),
            skip_steps=frozenset(i for i in steps if policy.step_skips(i, num_steps, plan)),
            sp_size=plan.sp_size,
            sp_async=sp_async,
            sp_sync_steps=policy.sp_sync_steps(num_steps, plan.sp_warmup) if sp_async else steps,
        )

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
        }
