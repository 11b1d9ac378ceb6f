"""Nodes that join the rendezvous late, or never, on emulated nodes (dice_ds/bench/nodes.py).

- A node that never joins: node 0 alone ends once the rendezvous timeout has passed, with one line
  naming the timeout and the fix (dice_ds/torchrun.py) and exit code 1: through
  ``python -m dice_ds.torchrun`` with c10d rendezvous (``--rdzv-conf join_timeout=5``: about 12 s
  on 2 cores, in the default suite) and, with ``DICE_DS_CLUSTER_FULL=1``, through the slurm
  script's per-node part (static rendezvous, ``RDZV_TIMEOUT=8``: scripts/launch.sh).
- A node that joins late but within the timeout is waited for (``DICE_DS_CLUSTER_FULL=1``): node 1
  starts 15 s after node 0 under torchrun (c10d) and under the slurm script (static), and the job
  ends as usual with every sample.
"""
import os
import time

import pytest

from dice_ds.bench.links import available

JOB = ["--model", "debug", "--init", "random", "--vae", "none", "--num-sampling-steps", "2",
       "--per-proc-batch-size", "1", "--num-fid-samples", "4", "--ep"]
FULL = os.environ.get("DICE_DS_CLUSTER_FULL") == "1"

pytestmark = pytest.mark.skipif(available() is not None, reason=f"emulated nodes: {available()}")


def _launch(tmp_path, launcher, port, delay_s=None, extra=None, limit_s=240):
    """Node 0 at once, node 1 after ``delay_s`` (None: never); (exit codes, seconds, node 0's
    log)."""
    from dice_ds.bench.node_launch import start_node, stop
    from dice_ds.bench.nodes import Nodes

    args = [*JOB, "--sample-dir", str(tmp_path / "out")]
    with Nodes(2, 2) as nodes:
        t0 = time.monotonic()
        procs = [start_node(launcher, nodes, 0, args, port, tmp_path, extra=extra)]
        try:
            if delay_s is not None:
                time.sleep(delay_s)
                assert procs[0].poll() is None, "node 0 ended before node 1 started"
                procs.append(start_node(launcher, nodes, 1, args, port, tmp_path, extra=extra))
            while any(p.poll() is None for p in procs) and time.monotonic() - t0 < limit_s:
                time.sleep(0.1)
            codes = [p.poll() for p in procs]
        finally:
            stop(procs)
    return codes, time.monotonic() - t0, (tmp_path / "node0.log").read_text(errors="replace")


def _one_line(log: str) -> list[str]:
    lines = [ln for ln in log.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in log, log[-3000:]
    return lines


def test_a_node_that_never_joins_ends_the_launch_with_one_line(tmp_path):
    codes, seconds, log = _launch(tmp_path, "dice_ds.torchrun", 29540,
                                  extra=["--rdzv-conf", "join_timeout=5"], limit_s=90)
    assert codes == [1], (codes, log[-3000:])
    line = _one_line(log)[0]
    assert line.startswith("dice_ds.torchrun: error: not every node joined the rendezvous")
    assert "within its timeout of 5 s" in line and "--rdzv-conf join_timeout=SECONDS" in line
    assert 5 <= seconds < 60, seconds
    assert not (tmp_path / "out" / "latents").exists()


@pytest.mark.skipif(not FULL, reason="the slurm script's rendezvous timeout: "
                                     "DICE_DS_CLUSTER_FULL=1")
def test_a_node_that_never_joins_the_slurm_job_ends_it_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RDZV_TIMEOUT", "8")
    codes, seconds, log = _launch(tmp_path, "slurm", 29550, limit_s=120)
    assert codes == [1], (codes, log[-3000:])
    line = _one_line(log)[0]
    assert "within its timeout of 8 s (1/2 nodes joined)" in line and "RDZV_TIMEOUT" in line
    assert 8 <= seconds < 90, seconds


@pytest.mark.skipif(not FULL, reason="late joins (about 2 minutes): DICE_DS_CLUSTER_FULL=1")
@pytest.mark.parametrize("launcher, port", [("torchrun", 29560), ("slurm", 29570)])
def test_a_node_that_joins_late_is_waited_for(tmp_path, launcher, port):
    codes, seconds, log = _launch(tmp_path, launcher, port, delay_s=15)
    assert codes == [0, 0], (codes, log[-3000:])
    assert len(os.listdir(tmp_path / "out" / "latents")) == 4
    assert "on 4 rank(s)" in log + (tmp_path / "node1.log").read_text(errors="replace")
    assert seconds > 15
