"""The one error line of a rank that found a bad input, seen under every launcher (issue 21 item 4).

Owns ``print_error_line``: how a rank that found a usage error (argparse, a ``ConfigError``) makes
its line visible before it exits 2, and ``launched_rank`` (this process's rank when a launcher
started several, read without raising: the error path must not fail on the environment it reports).

Under a launcher every rank runs the same checks, but an input may be bad on one rank only (an
environment value, a file present on one node), and the launcher stops every rank as soon as one
exits (torchrun's agent and the deepspeed launcher send SIGTERM, then SIGKILL after 30 s). So:

- every rank that finds an error prints the line itself: none relies on another rank to print it
  (before, only rank 0 printed, and it was often SIGTERMed before it did);
- the same line is printed once per launcher process (per node): the first rank to create a marker
  file (``O_EXCL``) named after the launcher (parent pid and its start time), the restart attempt and
  the line prints it, the others stay silent. Lines of several nodes are not merged;
- SIGTERM is ignored while the line is claimed, printed and flushed (main thread only), so a
  launcher stopping the ranks cannot cut it; the caller then exits 2 at once;
- under torchrun the line is also the rank's error file (``TORCHELASTIC_ERROR_FILE``), so torchrun's
  own failure summary shows it as the root cause instead of "To enable traceback see ...".

What each launcher does with the exit code 2: docs/bad-inputs.md ("Under a launcher");
``dice_ds.torchrun`` (what ``scripts/launch.sh`` runs) passes it on.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
import time

MARKER_MAX_AGE_S = 3600.0
"""Markers older than this are removed when a line is claimed (each is an empty file)."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def launched_rank() -> int | None:
    """This process's rank when a launcher started a world of several ranks (torchrun, deepspeed:
    RANK and WORLD_SIZE; srun: SLURM_PROCID and SLURM_NTASKS), else None. Never raises."""
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        rank, world = _env_int(rank_key), _env_int(world_key)
        if rank is not None and world is not None and world > 1:
            return rank
    return None


def _launcher_key() -> str:
    """Names this launch: the parent (the launcher's agent) by pid and start time, the restart
    attempt and the rendezvous port (ranks of one launch share all four)."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as fh:
            started = fh.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in ticks
    except (OSError, IndexError):
        started = "?"
    return ":".join([str(ppid), started, os.environ.get("TORCHELASTIC_RESTART_COUNT", ""),
                     os.environ.get("MASTER_PORT", "")])


def _claim(line: str) -> bool:
    """True when this rank is the first of its launch to report ``line`` (or when no marker can be
    made: then the line is printed rather than lost)."""
    folder = os.path.join(tempfile.gettempdir(), f"dice-ds-errors-{os.getuid()}")
    digest = hashlib.sha256(f"{_launcher_key()}\n{line}".encode()).hexdigest()[:32]
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.close(os.open(os.path.join(folder, digest), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    _prune(folder)
    return True


def _prune(folder: str) -> None:
    now = time.time()
    try:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if now - os.path.getmtime(path) > MARKER_MAX_AGE_S:
                os.unlink(path)
    except OSError:
        pass  # another rank pruned it first


def _write_torchelastic_error_file(line: str) -> None:
    """The line as this rank's torchrun error file (the format torchrun's ``ProcessFailure``
    reads: ``torch/distributed/elastic/multiprocessing/errors``); nothing without torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    data = {"message": {"message": line,
                        "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(data, fh)
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # the printed line is what matters


def print_error_line(prog: str, message: str) -> None:
    """Print ``{prog}: error: {message}`` on stderr, visible under any launcher (module docstring):
    with several launched ranks the line names the rank that found it and is printed once per
    launcher; alone it is printed as is."""
    rank = launched_rank()
    if rank is None:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main_thread else None
    try:
        if _claim(f"{prog}: error: {message}"):
            print(f"{prog}: error: rank {rank}: {message}", file=sys.stderr, flush=True)
        _write_torchelastic_error_file(f"{prog}: error: rank {rank}: {message}")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
