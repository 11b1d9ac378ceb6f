"""One run per sample directory: the run lock taken by ``SampleDir.claim`` (dice_ds.runlock), the
refusal that names the other run, taking over a lock left by a run that ended, ``release``, and two
real ``dice-ds sample`` processes into one directory."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dice_ds import runlock
from dice_ds.config import ConfigError
from dice_ds.outputs import SampleDir, run_fingerprint

FP = run_fingerprint(settings={"model": "debug", "cfg_scale": 1.5}, plan_fields={"ep_size": 1},
                     world_size=1, per_proc_batch_size=2)

HOLDER = textwrap.dedent("""
    import json, os, sys
    from dice_ds.outputs import SampleDir
    out = SampleDir(sys.argv[1])
    out.claim(json.loads(sys.argv[2]))
    print("locked", flush=True)
    for line in sys.stdin:
        if line.strip() == "release":
            out.release()
            print("released", flush=True)
        elif line.strip() == "die":
            os._exit(0)  # no atexit: the lock file stays, the kernel drops the flock
""")


class Holder:
    """Another process that claimed ``path`` and holds its lock until told otherwise."""

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, path, json.dumps(FP)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def tell(self, what):
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def holder(tmp_path):
    h = Holder(str(tmp_path / "run"))
    yield h
    h.close()


def test_claim_takes_the_lock_and_names_this_run_in_it(tmp_path):
    out = SampleDir(str(tmp_path / "new" / "run"))  # not there yet: created
    out.claim(FP)
    info = runlock.read_holder(out.path)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["start_time"].endswith("Z")
    assert out.claim(FP) is None  # the same process again: its own lock, reused
    out.release()
    assert not os.path.exists(os.path.join(out.path, runlock.LOCK_FILE))
    out.release()  # idempotent


def test_a_second_run_is_refused_with_one_line_naming_the_first(tmp_path, holder):
    out = SampleDir(str(tmp_path / "run"))
    for force_new in (False, True):  # --force-new does not move a live run's directory aside
        with pytest.raises(ConfigError) as e:
            out.claim(FP, force_new=force_new)
        msg = str(e.value)
        assert "\n" not in msg and "in use by another dice-ds sample run" in msg
        assert f"pid {holder.proc.pid} on host {socket.gethostname()}, started 20" in msg
        assert "wait for it to finish" in msg and "--sample-dir" in msg
    assert runlock.read_holder(out.path)["pid"] == holder.proc.pid  # untouched by the refusals


def test_release_frees_the_directory(tmp_path, holder):
    holder.tell("release")
    assert holder.proc.stdout.readline().strip() == "released"
    assert not os.path.exists(tmp_path / "run" / runlock.LOCK_FILE)
    out = SampleDir(str(tmp_path / "run"))
    out.claim(FP)
    assert runlock.read_holder(out.path)["pid"] == os.getpid()
    out.release()


def test_a_lock_left_by_a_run_that_died_is_taken_over_with_a_note(tmp_path, holder, capsys):
    holder.tell("die")
    holder.proc.wait(timeout=30)
    assert runlock.read_holder(str(tmp_path / "run"))["pid"] == holder.proc.pid  # file left
    out = SampleDir(str(tmp_path / "run"))
    out.claim(FP)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "taking over the run lock" in err
    assert f"pid {holder.proc.pid}" in err
    assert runlock.read_holder(out.path)["pid"] == os.getpid()
    out.release()


def test_a_forked_child_does_not_give_back_its_parents_lock(tmp_path):
    out = SampleDir(str(tmp_path / "run"))
    out.claim(FP)
    pid = os.fork()
    if pid == 0:  # the child shares the flock; its release (or exit handlers) must not drop it
        try:
            out.release()
            runlock._release_all()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    probe = subprocess.run([sys.executable, "-c", HOLDER, out.path, json.dumps(FP)],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and f"pid {os.getpid()} on host" in probe.stderr
    out.release()
    assert not os.path.exists(os.path.join(out.path, runlock.LOCK_FILE))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_hand_written_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    path = tmp_path / "run"
    path.mkdir()
    (path / runlock.LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": _dead_pid(), "start_time": "2020-01-01T00:00:00Z"}))
    out = SampleDir(str(path))
    out.claim(FP)
    assert "2020-01-01T00:00:00Z" in capsys.readouterr().err
    out.release()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch, capsys):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    path = tmp_path / "run"
    path.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid, host in ((alive.pid, socket.gethostname()), (12345, "elsewhere")):
            (path / runlock.LOCK_FILE).write_text(json.dumps(
                {"host": host, "pid": pid, "start_time": "2020-01-01T00:00:00Z"}))
            with pytest.raises(ConfigError) as e:
                SampleDir(str(path)).claim(FP)
            assert f"pid {pid} on host {host}" in str(e.value)
            assert f"delete {path / runlock.LOCK_FILE}" in str(e.value)
    finally:
        alive.kill()
        alive.wait()
    (path / runlock.LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": alive.pid, "start_time": "2020-01-01T00:00:00Z"}))
    out = SampleDir(str(path))
    out.claim(FP)  # its holder is gone
    assert "taking over" in capsys.readouterr().err
    out.release()


def test_force_new_moves_the_old_samples_and_keeps_the_lock_on_the_new_directory(tmp_path):
    import numpy as np

    out = SampleDir(str(tmp_path / "run"))
    out.claim(FP)
    out.write_images([0], np.zeros((1, 4, 4, 3), np.uint8))
    other = dict(FP, cfg_scale=2.0)
    moved = out.claim(other, force_new=True)
    assert not os.path.exists(os.path.join(moved, runlock.LOCK_FILE))
    assert runlock.read_holder(out.path)["pid"] == os.getpid()
    out.write_images([0], np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ConfigError, match="holds samples of another run"):
        out.claim(FP)  # refused: the lock is given back with the refusal
    assert not os.path.exists(os.path.join(out.path, runlock.LOCK_FILE))


def _sample_cmd(num_samples, steps=20):
    return [sys.executable, "-m", "dice_ds.cli", "sample", "--model", "debug", "--init", "random",
            "--vae", "none", "--device", "cpu", "--num-fid-samples", str(num_samples),
            "--per-proc-batch-size", "2", "--num-sampling-steps", str(steps), "--sample-dir", "out"]


def test_two_sample_runs_into_one_directory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DICE_DS_CACHE_DIR": str(tmp_path / "cache")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # the first run samples far longer than this test lasts; it holds the lock once its pid is in
    # the lock file (written after the flock), so the second starts while the first holds it
    first = subprocess.Popen(_sample_cmd(100000), cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (runlock.read_holder(str(tmp_path / "out")) or {}).get("pid") != first.pid:
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        second = subprocess.run(_sample_cmd(4), cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert first.poll() is None  # still sampling: the refusal below is deterministic
        assert second.returncode == 2, second.stderr[-2000:]
        errors = [ln for ln in second.stderr.splitlines() if "error" in ln]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"in use by another dice-ds sample run (pid {first.pid} on host" in errors[0]
        assert "--sample-dir" in errors[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # the killed run's lock file is left behind; the next run takes it over and samples
    third = subprocess.run(_sample_cmd(4), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over the run lock left by pid {first.pid}" in third.stderr
