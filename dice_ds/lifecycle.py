"""The lifecycle every parallel runtime implements, and a stack of runtimes.

Owns ``StepRuntime`` (the protocol the pipeline's denoising loop drives, dice_ds/pipeline/denoise.py:
``with runtime.batch(schedule):`` around each batch, ``begin_step(i)`` before every model forward
with i counting down S..1, ``stats()`` afterwards; ``reset_stats()`` zeroes the traffic, cache and
phase counters), ``BatchLifecycle`` (the ``batch`` context of the dice_ds runtimes, from their
``_start`` / ``_finish`` / ``_abort``) and ``RuntimeStack``, which drives several runtimes of one
model as one (the EP runtime of the MoE layers and the SP runtime of the attention layers).

Invariants: runtimes never count steps (the step index arrives through ``begin_step``) and never
build a schedule (the batch's arrives through ``batch``); a batch always ends with every exchange
finished: normally by ``_finish``, on an exception (also one mid-forward, on every rank alike) by
``_abort``, so nothing is left in flight for the next batch.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Protocol, runtime_checkable


@runtime_checkable
class StepRuntime(Protocol):
    """What the denoising loop calls on a runtime (``dice_ds.moe.runtime.DiceRuntime``,
    ``dice_ds.parallel.sp.SequenceParallelRuntime``, ``RuntimeStack``)."""

    def batch(self, schedule):
        """Context of one batch under ``schedule`` (a ``dice_ds.schedule.Schedule``)."""

    def begin_step(self, step: int) -> None:
        """Before every model forward: step i of the schedule's S, counting down."""

    def stats(self) -> dict:
        """JSON-able measurements."""


class BatchLifecycle:
    """``batch(schedule)`` for a runtime with ``_start(schedule)`` (reset to an empty state, take
    the schedule), ``_finish()`` (wait on everything in flight, free held buffers) and
    ``_abort()`` (the same after a failure mid-batch: also finish a call cut short)."""

    in_batch = False

    @contextmanager
    def batch(self, schedule):
        self._start(schedule)
        self.in_batch = True
        try:
            yield self
        except BaseException as e:
            self.in_batch = False
            try:
                self._abort()
            except Exception as abort_error:  # keep the original failure, name the second
                e.add_note(f"{type(self).__name__}: aborting the batch's exchanges failed too: "
                           f"{type(abort_error).__name__}: {abort_error}")
            raise
        self.in_batch = False
        self._finish()


class RuntimeStack:
    """Several runtimes driven as one: each runtime's ``batch`` is entered in order (and left in
    reverse order, each finishing or aborting), ``begin_step`` goes to each; ``stats()`` merges."""

    def __init__(self, *runtimes):
        self.runtimes = tuple(runtimes)

    @contextmanager
    def batch(self, schedule):
        with ExitStack() as stack:
            for rt in self.runtimes:
                stack.enter_context(rt.batch(schedule))
            yield self

    def begin_step(self, step: int) -> None:
        for rt in self.runtimes:
            rt.begin_step(step)

    def reset_stats(self) -> None:
        for rt in self.runtimes:
            rt.reset_stats()

    def detach(self) -> None:
        for rt in reversed(self.runtimes):
            rt.detach()

    def inflight_handles(self) -> int:
        return sum(rt.inflight_handles() for rt in self.runtimes)

    def held_bytes(self) -> int:
        return sum(rt.held_bytes() for rt in self.runtimes)

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
