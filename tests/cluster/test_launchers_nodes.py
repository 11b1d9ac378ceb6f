"""Every launcher across emulated nodes: 2 network-namespace nodes x 2 ranks (dice_ds/bench/nodes.py),
each node running its launcher as a cluster host would (dice_ds/bench/node_launch.py): torchrun
with c10d rendezvous, the DeepSpeed launcher with --no_ssh and a hostfile, and the slurm script's
per-node part (scripts/slurm_node.sh) with the SLURM_* variables of an allocation.

The jobs and the checks are scripts/cluster_check.py's, which scripts/cluster_test.sbatch runs on
a real allocation: the exact modes (DP, sync EP) equal one plain process bit for bit, a stale mode
(DICE, displaced SP) gives the same samples through every launcher. The default run is one
launch (torchrun, DICE: about 25 s on 2 cores, which the 10-minute suite can afford; each launch
starts 4 ranks and a launcher); ``DICE_DS_CLUSTER_FULL=1`` runs all 12 (launcher, mode) pairs. Skipped
with the reason where network namespaces cannot be made.
"""
import os
import runpy
import sys

import pytest

from dice_ds.bench.links import available

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = runpy.run_path(os.path.join(ROOT, "scripts", "cluster_check.py"))
DEFAULT = [("torchrun", "dice")]
FULL = [(launcher, mode) for launcher in ("torchrun", "deepspeed", "slurm")
        for mode in CHECK["MODES"]]
RUNS = FULL if os.environ.get("DICE_DS_CLUSTER_FULL") == "1" else DEFAULT

pytestmark = pytest.mark.skipif(available() is not None, reason=f"emulated nodes: {available()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The fabric (2 nodes x 2 ranks, 1 gbit between nodes) and the one-process reference."""
    import subprocess

    from dice_ds.bench.nodes import Nodes

    out = tmp_path_factory.mktemp("cluster")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "dice_ds.sample", *CHECK["flags"]("dp"), "--sample-dir",
                    str(out / "reference")], check=True, capture_output=True, env=env, timeout=120)
    with Nodes(2, 2) as nodes:
        nodes.shape("1gbit")
        yield nodes, out


@pytest.mark.parametrize("launcher, mode", RUNS)
def test_launcher_across_two_nodes(cluster, launcher, mode):
    from dice_ds.bench.node_launch import run_on_nodes

    nodes, out = cluster
    run = out / launcher / mode
    port = 29500 + 10 * RUNS.index((launcher, mode))
    got = run_on_nodes(launcher, nodes, [*CHECK["flags"](mode), "--sample-dir", str(run)], port,
                       out / f"{launcher}-{mode}-logs", timeout_s=240)
    assert got.ok, (got.returncodes, got.log_text(0)[-3000:], got.log_text(1)[-3000:])
    done = [(launcher_, mode_) for launcher_, mode_ in RUNS if (out / launcher_ / mode_).exists()]
    failed = [line for ok, line in CHECK["check"](str(out), done) if not ok]
    assert not failed, failed
    assert "on 4 rank(s)" in got.log_text(0) + got.log_text(1)
    import json

    layout = json.load(open(run / "run.json"))["layout"]  # 2 nodes: ranks 0-1 and 2-3
    assert layout["nodes"] == 2 and len(set(layout["hosts"][:2])) == 1
    assert layout["hosts"][0] != layout["hosts"][2]
