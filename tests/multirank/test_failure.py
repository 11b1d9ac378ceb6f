"""Bounded failure: a 2-rank expert-parallel run (plain launch: two ``python -m dice_ds.sample``
processes with RANK/WORLD_SIZE/MASTER_ADDR) whose rank 1 is killed or stopped mid-run.

Rank 0 must exit non-zero within the collective timeout (``--pg-timeout``) plus slack, with one
line naming itself, the step and the batch. The measured time from the signal to rank 0's exit is
printed (``pytest -s`` shows it).
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

TIMEOUT_S = 10
SLACK_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp_path):
    port = _free_port()
    flags = ["--model", "debug", "--init", "random", "--vae", "none", "--device", "cpu",
             "--ep", "--ep-async", "--num-sampling-steps", "40", "--per-proc-batch-size", "2",
             "--num-fid-samples", "400", "--pg-timeout", str(TIMEOUT_S),
             "--sample-dir", str(tmp_path / "out")]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "dice_ds.sample", *flags],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _wait_until_sampling(procs, tmp_path, limit=120):
    """Until the first batch's files exist (both ranks are inside the batch loop)."""
    latents = tmp_path / "out" / "latents"
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if latents.is_dir() and any(latents.iterdir()):
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("a rank ended before sampling: " + procs[0].communicate()[1][-3000:])
        time.sleep(0.2)
    pytest.fail("sampling did not start")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_peer_failure_ends_every_rank_within_the_timeout(tmp_path, sig):
    procs = _start_ranks(tmp_path)
    try:
        _wait_until_sampling(procs, tmp_path)
        procs[1].send_signal(sig)
        t0 = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=TIMEOUT_S + SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {TIMEOUT_S + SLACK_S} s after rank 1 got {sig.name}")
        seconds = time.monotonic() - t0
        print(f"\nrank 1 {sig.name}: rank 0 exited {procs[0].returncode} after {seconds:.1f} s "
              f"(pg timeout {TIMEOUT_S} s)")
        assert procs[0].returncode == 1, err[-3000:]
        line = [ln for ln in err.splitlines() if "peer failed/timed out" in ln]
        # the signal can land inside a batch ("step k/40") or between two ("before step 1")
        assert line and re.search(r"rank 0: (step \d+/40|before step 1) of batch \d+: peer failed/"
                                  r"timed out after [\d.]+ s \(collective timeout 10 s", line[0]), err[-3000:]
        assert "Traceback" not in err
        if sig == signal.SIGSTOP:
            assert seconds > TIMEOUT_S * 0.8  # only the timeout can notice a stopped peer
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # the stopped rank (SIGKILL works on a stopped process)
            p.communicate(timeout=30)
    assert all(p.returncode != 0 for p in procs)
