"""One sampling job across emulated nodes, started by a real launcher in every node.

Owns the per-node command of each launcher, as a cluster would run it on every host:

- ``torchrun``: ``--nnodes M --node_rank i --nproc_per_node K`` with c10d rendezvous at node 0
  (by host name: node 0 recognises itself and hosts the store);
- ``deepspeed``: ``--no_ssh --node_rank i --num_nodes M --num_gpus K --master_addr`` and a
  hostfile naming every node (``dds-node<i> slots=K``), with the CPU accelerator;
- ``slurm``: ``scripts/slurm_node.sh`` (what ``srun`` runs on every node of an allocation) with
  the ``SLURM_*`` variables a real allocation sets (job node list, node count, node id, CPUs per
  task, submit directory); only ``srun`` itself is not used.

and ``run_on_nodes``: start the launcher of every node (each the leader of its own session),
wait for all within a timeout, kill what is left on every exit path, and return each node's exit
code, log and the wall time. The fabric is ``dice_ds.bench.nodes.Nodes``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dice_ds.bench.launch import kill_sessions
from dice_ds.bench.nodes import Nodes, node_name

LAUNCHERS = ("torchrun", "deepspeed", "slurm")
WRAPPED_TORCHRUN = "dice_ds.torchrun"
"""Also accepted as a launcher: torchrun's own code through ``python -m dice_ds.torchrun`` (one
line for a failed launch or a rendezvous timeout), with the torchrun launcher's arguments."""
ROOT = Path(__file__).resolve().parents[2]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def node_command(launcher: str, nodes: Nodes, node: int, args: list[str], port: int,
                 workdir: Path, rdzv_id: str = "dice-ds") -> tuple[list[str], dict]:
    """(argv, environment) of ``launcher`` on node ``node`` for ``dice_ds.sample args``."""
    env = nodes.node_env(node, port)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    m, k = nodes.nodes, nodes.ranks_per_node
    if launcher in ("torchrun", WRAPPED_TORCHRUN):
        head = [_bin("torchrun")] if launcher == "torchrun" else [sys.executable, "-m", launcher]
        argv = [*head, "--nnodes", str(m), "--node_rank", str(node),
                "--nproc_per_node", str(k), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{node_name(0)}:{port + 1}", "--rdzv-id", rdzv_id,
                "-m", "dice_ds.sample", *args]
    elif launcher == "deepspeed":
        hostfile = workdir / "hostfile"
        hostfile.write_text("".join(f"{node_name(i)} slots={k}\n" for i in range(m)))
        env["DS_ACCELERATOR"] = "cpu"
        argv = [_bin("deepspeed"), "--no_ssh", "--hostfile", str(hostfile), "--node_rank",
                str(node), "--num_nodes", str(m), "--num_gpus", str(k), "--master_addr",
                node_name(0), "--master_port", str(port), "--module", "dice_ds.sample", *args]
    elif launcher == "slurm":
        for key in ("MASTER_ADDR", "NNODES", "NODE_RANK"):  # slurm_node.sh derives them
            env.pop(key, None)
        env.update(SLURM_JOB_NODELIST=f"dds-node[0-{m - 1}]", SLURM_NNODES=str(m),
                   SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_NTASKS=str(m),
                   SLURM_CPUS_PER_TASK=str(k), SLURM_SUBMIT_DIR=str(ROOT), NPROC=str(k),
                   PYTHON=sys.executable)
        env.pop("OMP_NUM_THREADS", None)  # derived from SLURM_CPUS_PER_TASK, as on a cluster
        argv = ["bash", str(ROOT / "scripts" / "slurm_node.sh"), *args]
    else:
        raise ValueError(f"launcher {launcher!r}: use one of {', '.join(LAUNCHERS)} or "
                         f"{WRAPPED_TORCHRUN}")
    return argv, env


@dataclass
class NodeRun:
    """What every node's launcher did."""

    returncodes: list[int | None]
    """Each node's exit code (None: killed at the timeout)."""
    logs: list[Path]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def log_text(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace")


def start_node(launcher: str, nodes: Nodes, node: int, args: list[str], port: int, workdir: Path,
               rdzv_id: str = "dice-ds", extra: list[str] | None = None) -> subprocess.Popen:
    """Start node ``node``'s launcher in its namespace; its log is ``workdir/node<i>.log``.
    ``extra``: launcher flags placed before the program (e.g. torchrun's ``--max-restarts``)."""
    argv, env = node_command(launcher, nodes, node, args, port, workdir, rdzv_id)
    if extra:
        cut = argv.index("dice_ds.sample") - 1  # before its "-m" / "--module"
        argv = argv[:cut] + list(extra) + argv[cut:]
    with open(workdir / f"node{node}.log", "w") as log:
        return subprocess.Popen([*nodes.prefix(node), *argv], env=env, cwd=str(workdir),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill every launcher's whole session (its ranks too) and reap them."""
    kill_sessions(procs)


def run_on_nodes(launcher: str, nodes: Nodes, args: list[str], port: int, workdir: Path,
                 timeout_s: float = 300.0, rdzv_id: str = "dice-ds") -> NodeRun:
    """``dice_ds.sample args`` on every node through ``launcher``; waits for all of them."""
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    try:
        for node in range(nodes.nodes):
            procs.append(start_node(launcher, nodes, node, args, port, workdir, rdzv_id))
        deadline = t0 + timeout_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        codes = [p.poll() for p in procs]
        stop(procs)
    return NodeRun(codes, [workdir / f"node{i}.log" for i in range(len(procs))],
                   time.monotonic() - t0)
