"""The lifecycle protocol every parallel runtime implements, and a stack of runtimes.

Owns ``StepRuntime`` (the protocol the samplers drive: ``reset()`` at the start of a batch,
``begin_step(i, S)`` before every model forward with i counting down S..1, ``finish()`` at the
end of a batch, ``stats()`` afterwards; the dice_ds runtimes and the stack also have
``reset_stats()``, which zeroes the traffic, cache and phase counters) and ``RuntimeStack``, which
drives several runtimes of one model as one (the EP runtime of the MoE layers and the SP runtime
of the attention layers).

Invariant: runtimes never count steps; the step index arrives through ``begin_step``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class StepRuntime(Protocol):
    """What a sampler calls on a runtime (``dice_ds.moe.runtime.DiceRuntime``,
    ``dice_ds.parallel.sp.SequenceParallelRuntime``)."""

    def reset(self) -> None:
        """Start of a batch: wait on everything in flight, clear every cross-step state."""

    def begin_step(self, step: int, num_steps: int) -> None:
        """Before every model forward: step i of S, counting down."""

    def finish(self) -> None:
        """End of a batch: wait on everything in flight and free held buffers."""

    def stats(self) -> dict:
        """JSON-able measurements."""


class RuntimeStack:
    """Several runtimes driven as one: lifecycle calls go to each in order; ``stats()`` merges."""

    def __init__(self, *runtimes):
        self.runtimes = tuple(runtimes)

    def reset(self) -> None:
        for rt in self.runtimes:
            rt.reset()

    def begin_step(self, step: int, num_steps: int) -> None:
        for rt in self.runtimes:
            rt.begin_step(step, num_steps)

    def finish(self) -> None:
        for rt in self.runtimes:
            rt.finish()

    def reset_stats(self) -> None:
        for rt in self.runtimes:
            rt.reset_stats()

    def detach(self) -> None:
        for rt in reversed(self.runtimes):
            rt.detach()

    def inflight_handles(self) -> int:
        return sum(rt.inflight_handles() for rt in self.runtimes)

    def stats(self) -> dict:
        merged: dict = {}
        for rt in self.runtimes:
            stats = rt.stats()
            overlap = merged.keys() & stats.keys()
            if overlap:
                raise KeyError(f"runtimes report the same stats keys {sorted(overlap)}")
            merged.update(stats)
        return merged

    def __getitem__(self, kind: type):
        """The runtime of class ``kind`` (e.g. ``stack[DiceRuntime]``)."""
        for rt in self.runtimes:
            if isinstance(rt, kind):
                return rt
        raise KeyError(kind)
