"""Measurement for the DICE runtime: per-phase timers and the communication / cache ledger.

Owns ``PhaseTimer`` (exclusive wall time per named phase; nested phases are subtracted from their
parent, so the phases of a run add up to its total) and ``CommLedger`` (all-to-all rows and bytes
this rank sends, per step / layer / kind, and the peak bytes of exchanges held across steps).

Clocks: ``time.perf_counter`` on CPU. On CUDA, phases are bracketed by CUDA events, resolved (one
device synchronisation) only when ``seconds()`` is read: timing adds no host sync to the hot path.
No CUDA call is made unless the timer was built for a CUDA device (pitfall 14).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Exclusive time per phase name; ``with timer.phase('experts'): ...``."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._stack: list[int] = []
        self._open: list[list] = []  # [name, start, end, parent_index]
        self._seconds: dict[str, float] = defaultdict(float)

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        parent = self._stack[-1] if self._stack else -1
        entry = [name, self._mark(), None, parent]
        self._open.append(entry)
        self._stack.append(len(self._open) - 1)
        try:
            yield
        finally:
            entry[2] = self._mark()
            self._stack.pop()
            if not self._stack and not self.cuda:
                self._resolve()

    def _resolve(self) -> None:
        if self.cuda and self._open:
            torch.cuda.synchronize()
        for name, start, end, parent in self._open:
            dur = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            self._seconds[name] += dur
            if parent >= 0:
                self._seconds[self._open[parent][0]] -= dur
        self._open.clear()

    def seconds(self) -> dict[str, float]:
        if self._stack:
            raise RuntimeError("PhaseTimer.seconds() read inside an open phase")
        self._resolve()
        return dict(self._seconds)

    def reset(self) -> None:
        self._open.clear()
        self._stack.clear()
        self._seconds.clear()


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
