"""Start-up and memory accounting of one rank: seconds per phase, bytes read, resident memory.

Owns ``StartupLog`` (what ``run.json`` reports under ``startup``): named phases (imports, process
groups, checkpoint hash, model build, weight load, first step) each with its wall seconds and the
largest resident set seen while it ran, split where Linux tells it (``/proc/self/status``: RssAnon,
the process's own memory; RssFile, mapped file pages), sampled by a background thread every
``interval`` seconds while a phase is open; and ``seconds_since_process_start`` (from
``/proc/self/stat``: interpreter start-up and imports before ``main`` runs).

Invariants: reading only (``/proc`` and ``getrusage``); on a system without ``/proc`` the split
fields are None and only seconds and ``ru_maxrss`` are reported; nothing here imports torch.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager

_FIELDS = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}


def memory_now() -> dict[str, int | None]:
    """Resident bytes now: rss, anon, file, shmem (None where /proc does not say)."""
    out: dict[str, int | None] = dict.fromkeys(_FIELDS.values())
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                name = _FIELDS.get(line.split(None, 1)[0])
                if name:
                    out[name] = int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return out


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (None without /proc)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            btime = next(int(ln.split()[1]) for ln in fh if ln.startswith("btime"))
    except (OSError, ValueError, StopIteration, IndexError):
        return None
    return time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK"))


class StartupLog:
    """Phases of a rank's start-up with seconds and peak resident memory (module doc)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, dict[str, int | None]] = {}
        self.facts: dict[str, object] = {}
        self._lock = threading.Lock()
        self._open: dict[str, dict[str, int | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- sampling
    def _sample(self) -> None:
        now = memory_now()
        with self._lock:
            for peak in self._open.values():
                for k, v in now.items():
                    if v is not None and (peak[k] is None or v > peak[k]):
                        peak[k] = v

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dice-ds-memwatch", daemon=True)
            self._thread.start()

    # -- phases
    @contextmanager
    def phase(self, name: str):
        """Time ``name`` and record the peak resident memory while it runs."""
        with self._lock:
            self._open[name] = memory_now()
        self._ensure_thread()
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self._sample()
            with self._lock:
                self.peaks[name] = self._open.pop(name)
                idle = not self._open
            if idle:
                self.stop()

    def begin(self, name: str) -> None:
        """Open a phase that ends later in another place (``end``), e.g. the first step."""
        cm = self.phase(name)
        cm.__enter__()
        self.facts.setdefault("_pending", {})[name] = cm

    def end(self, name: str) -> None:
        cm = self.facts.get("_pending", {}).pop(name, None)
        if cm is not None:
            cm.__exit__(None, None, None)

    def stop(self) -> None:
        self._stop.set()

    def as_dict(self) -> dict:
        """The ``startup`` entry of one rank in ``run.json``."""
        facts = {k: v for k, v in self.facts.items() if not k.startswith("_")}
        peak_all = {k: max((p[k] for p in self.peaks.values() if p[k] is not None), default=None)
                    for k in _FIELDS.values()}
        return {"seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "peak_bytes": self.peaks, "peak_bytes_startup": peak_all,
                "peak_rss_bytes": peak_rss_bytes(), **facts}
