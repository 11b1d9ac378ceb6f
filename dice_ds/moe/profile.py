"""Measurement for the DICE runtime: per-phase timers and the communication / cache ledger.

Owns ``PhaseTimer`` (exclusive wall time per named phase; nested phases are subtracted from their
parent, so the phases of a run add up to its total) and ``CommLedger`` (all-to-all rows and bytes
this rank sends, per step / layer / kind, and the peak bytes of exchanges held across steps).

Clocks: ``time.perf_counter`` on CPU. On CUDA, phases are bracketed by CUDA events; timing adds no
host sync to the hot path. Events are resolved incrementally: whenever a top-level phase ends with
more than ``max_pending`` entries pending, the entries whose end event has completed
(``Event.query()``, non-blocking) are folded into the totals and their events dropped, so memory
stays bounded over a long run. Only if the device lags ``hard_cap`` entries behind the host does
the timer wait, on the oldest pending event (the CUDA launch queue would stall the host soon
anyway). ``seconds()`` resolves the rest (one device synchronisation). No CUDA call is made unless
the timer was built for a CUDA device (pitfall 14).

Tracing (CPU, for profiling one call at a time: ``scripts/profile_sync_exchange.py``): with
``trace`` a list, every closed phase is also appended as ``(name, start, end, tag)``, its start and
end on ``time.perf_counter`` (CLOCK_MONOTONIC on Linux: one clock for every process of the
machine, so ranks' traces line up) and ``tag`` whatever the caller set last (the runtime sets
``(step, layer)`` at the start of each MoE call). Off (None) by default.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Exclusive time per phase name; ``with timer.phase('experts'): ...``."""

    def __init__(self, device: torch.device | str = "cpu", max_pending: int = 256,
                 hard_cap: int = 4096):
        if not 0 < max_pending <= hard_cap:
            raise ValueError(f"PhaseTimer: need 0 < max_pending={max_pending} <= hard_cap={hard_cap}")
        self.cuda = torch.device(device).type == "cuda"
        self.max_pending, self.hard_cap = max_pending, hard_cap
        self._stack: list[list] = []  # the entries of the phases open now, outermost first
        self._pending: list[list] = []  # [name, start, end, parent name or None], not yet counted
        self._seconds: dict[str, float] = defaultdict(float)
        self.peak_pending = 0
        """Most entries held at once (tests assert the bound)."""
        self.trace: list | None = None
        self.tag = None

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        parent = self._stack[-1][0] if self._stack else None
        entry = [name, self._mark(), None, parent]
        self._pending.append(entry)
        self.peak_pending = max(self.peak_pending, len(self._pending))
        self._stack.append(entry)
        try:
            yield
        finally:
            entry[2] = self._mark()
            self._stack.pop()
            if self.trace is not None and not self.cuda:
                self.trace.append((name, entry[1], entry[2], self.tag))
            if not self._stack:
                if not self.cuda:
                    self._resolve(self._pending)
                    self._pending = []
                elif len(self._pending) > self.max_pending:
                    self._resolve_completed()

    def _count(self, entry: list) -> None:
        name, start, end, parent = entry
        dur = start.elapsed_time(end) / 1e3 if self.cuda else end - start
        self._seconds[name] += dur
        if parent is not None:
            self._seconds[parent] -= dur

    def _resolve(self, entries: list[list]) -> None:
        for entry in entries:
            self._count(entry)

    def _resolve_completed(self) -> None:
        """Fold in every (closed) entry whose end event has completed; no device sync, unless more
        than ``hard_cap`` would stay pending: then wait for the oldest ones' end events."""
        keep = []
        for entry in self._pending:
            if entry[2].query():  # the end follows the start on the stream: both completed
                self._count(entry)
            else:
                keep.append(entry)
        excess = len(keep) - self.hard_cap
        for entry in keep[:max(excess, 0)]:
            entry[2].synchronize()
            self._count(entry)
        self._pending = keep[max(excess, 0):]

    def seconds(self) -> dict[str, float]:
        if self._stack:
            raise RuntimeError("PhaseTimer.seconds() read inside an open phase")
        if self.cuda and self._pending:
            torch.cuda.synchronize()
        self._resolve(self._pending)
        self._pending = []
        return dict(self._seconds)

    @property
    def pending(self) -> int:
        """Entries whose times are not yet folded into the totals."""
        return len(self._pending)

    def reset(self) -> None:
        self._pending = []
        self._stack.clear()
        self._seconds.clear()
        self.peak_pending = 0


class CommLedger:
    """All-to-all traffic sent by this rank, and the peak bytes of exchanges held across steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.rows_sent = 0
        self.bytes_sent = 0
        self.token_bytes_sent = 0
        self.rows_sent_remote = 0
        self.bytes_sent_remote = 0
        self.rows = defaultdict(int)  # (step, layer, kind) -> rows sent
        self.cache_bytes = 0
        self.cache_peak_bytes = 0
        self.send_inflight_peak_bytes = 0
        self.overlapped_calls = 0

    def sent(self, *, step: int, layer: int, kind: str, rows: int, token_bytes: int,
             prob_bytes: int = 0, remote_rows: int = 0, row_bytes: int = 0) -> None:
        """Record one all-to-all launch: ``rows`` rows (all destinations, self included)."""
        self.rows_sent += rows
        self.token_bytes_sent += token_bytes
        self.bytes_sent += token_bytes + prob_bytes
        self.rows_sent_remote += remote_rows
        self.bytes_sent_remote += remote_rows * row_bytes
        self.rows[(step, layer, kind)] += rows

    def observe_cache(self, held_bytes: int, send_bytes: int = 0) -> None:
        self.cache_bytes = held_bytes
        self.cache_peak_bytes = max(self.cache_peak_bytes, held_bytes)
        self.send_inflight_peak_bytes = max(self.send_inflight_peak_bytes, send_bytes)

    def rows_by_step(self) -> dict:
        """{step: {layer: {kind: rows}}} with string keys (JSON-able)."""
        out: dict = {}
        for (step, layer, kind), rows in sorted(self.rows.items()):
            out.setdefault(str(step), {}).setdefault(str(layer), {})[kind] = rows
        return out
