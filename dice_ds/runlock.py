"""The run lock of a sample directory: one ``dice-ds sample`` run per directory at a time.

Owns the lock file ``<dir>/.run.lock``: taking it, telling who holds it, taking over one left by a
run that has ended, and releasing it. ``dice_ds.outputs.SampleDir.claim`` takes it (rank 0, before
anything is written) and ``SampleDir.release`` gives it back.

Mechanism: the file is opened (created if missing) and locked with ``fcntl.flock(LOCK_EX |
LOCK_NB)`` on a descriptor kept open for the life of the process. The kernel drops a flock when the
process ends, however it ends (``os._exit``, a signal, a crash), so a lock whose flock is free was
left by a run that has ended and is taken over, with a one-line note on stderr naming that run.
Once locked, the holder writes JSON describing itself (host, pid, start time, user, command line,
kernel boot id) into the file in place (never by rename: the flock belongs to the file's inode),
so a refused run can name the run in its way.

File systems without flock (``ENOLCK``/``EOPNOTSUPP``/``ENOSYS``, e.g. a Lustre mount without the
``flock`` option) fall back to the JSON alone: a holder on this host is alive while its pid exists
and the kernel boot id is the same; a holder on another host cannot be checked and counts as alive
(the refusal then says which file to delete once that run is gone). Two runs starting within the
same few milliseconds may both pass this fallback; flock has no such window.

One process holds at most one lock per directory (keyed by real path): claiming a directory this
process already holds reuses the lock, so an in-process caller may run twice into one directory.
Every lock still held is released at interpreter exit (``atexit``); ``os._exit`` skips that, which
leaves the file (not the flock) behind for the next run to take over.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time

from dice_ds.config import ConfigError

LOCK_FILE = ".run.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: dict[str, "RunLock"] = {}  # real path of the directory -> this process's lock on it


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _describe_self() -> dict:
    try:
        user = os.getlogin()
    except OSError:
        user = os.environ.get("USER") or str(os.getuid())
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": user,
            "command": " ".join(sys.argv)[:500], "boot_id": _boot_id()}


def _parse(data: bytes) -> dict | None:
    try:
        info = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def read_holder(directory: str) -> dict | None:
    """The JSON of ``<directory>/.run.lock`` (None: no file, or nothing readable in it)."""
    try:
        with open(os.path.join(directory, LOCK_FILE), "rb") as fh:
            return _parse(fh.read())
    except OSError:
        return None


def _read_fd(fd: int, wait_s: float = 0.0) -> dict | None:
    """The JSON in the open lock file; waits up to ``wait_s`` for a holder that is writing it."""
    deadline = time.monotonic() + wait_s
    while True:
        info = _parse(os.pread(fd, 1 << 16, 0))
        if info is not None or time.monotonic() >= deadline:
            return info
        time.sleep(0.02)


def _name(info: dict | None) -> str:
    if not info:
        return "a run that left no details"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
            f"{info.get('start_time', '?')}")


def _is_this_process(info: dict | None) -> bool:
    return bool(info) and info.get("host") == socket.gethostname() and info.get("pid") == os.getpid()


def _pid_alive(info: dict) -> bool | None:
    """Whether the holder named in ``info`` still runs: None when that cannot be told (other host)."""
    if info.get("host") != socket.gethostname():
        return None
    if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
        return False  # written before this machine rebooted
    try:
        os.kill(int(info.get("pid")), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """This process's lock on one sample directory (see the module docstring)."""

    def __init__(self, fd: int, directory: str, info: dict):
        self.fd = fd
        self.directory = directory
        self.info = info
        self.pid = os.getpid()  # a forked child shares the flock: only this process gives it back

    @property
    def path(self) -> str:
        return os.path.join(self.directory, LOCK_FILE)

    def release(self, directory: str | None = None) -> None:
        """Remove the lock file (if it is still ours) and drop the flock; idempotent.

        ``directory``: where the lock file is now, when its directory was renamed after locking."""
        if self.fd < 0 or os.getpid() != self.pid:
            return
        path = os.path.join(directory or self.directory, LOCK_FILE)
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(path)):
                os.unlink(path)  # before the unlock: nobody can lock this inode and keep it
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        for key, lock in list(_HELD.items()):
            if lock is self:
                del _HELD[key]


def _busy(directory: str, holder: dict | None, checked: bool) -> Exception:
    tail = ("wait for it to finish, or use another --sample-dir" if checked else
            f"wait for it to finish, or use another --sample-dir (this file system has no flock: "
            f"if that run is gone, delete {os.path.join(directory, LOCK_FILE)})")
    return ConfigError(f"{directory} is in use by another dice-ds sample run ({_name(holder)}): "
                       f"{tail}")


def acquire(directory: str) -> RunLock:
    """Lock ``directory`` (which must exist) for this process, or raise ``ConfigError`` naming the
    run that holds it. A lock this process already holds on it is returned as it is."""
    key = os.path.realpath(directory)
    held = _HELD.get(key)
    if held is not None and held.fd >= 0 and held.pid == os.getpid():
        try:
            if os.path.samestat(os.fstat(held.fd), os.stat(held.path)):
                return held
        except OSError:
            pass
        held.release()  # its file was removed or replaced under it
    path = os.path.join(directory, LOCK_FILE)
    for _ in range(20):  # retried only when the file was replaced between open and flock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                raise _busy(directory, _read_fd(fd, wait_s=2.0), checked=True) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                flocked = False
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # its holder released (unlinked) it between our open and our flock
                os.close(fd)
                continue
            previous = _read_fd(fd)
            if not flocked and previous and not _is_this_process(previous):
                if _pid_alive(previous) is not False:
                    raise _busy(directory, previous, checked=False)
            if previous and not _is_this_process(previous):
                print(f"dice-ds sample: note: {directory}: taking over the run lock left by "
                      f"{_name(previous)}, which has ended", file=sys.stderr, flush=True)
            info = _describe_self()
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        lock = RunLock(fd, directory, info)
        _HELD[key] = lock
        return lock
    raise ConfigError(f"{directory}: could not take the run lock {path} (it keeps being replaced)")


def release(directory: str) -> None:
    """Release this process's lock on ``directory``, if it holds one."""
    lock = _HELD.get(os.path.realpath(directory))
    if lock is not None:
        lock.release()


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()
