"""The three launchers end to end on CPU (2 gloo ranks, debug model, tiny run), and the slurm
script's dry run on a fake 2-node allocation.

Each launcher writes the same latents for the same flags (data parallelism: identical at any world
size and launcher), and each rank sizes its thread pool to cores per rank when OMP_NUM_THREADS is
unset (deepspeed, scripts/launch.sh).
"""
import json
import os
import stat
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "ds", "debug_dp.json")
BIN = os.path.dirname(sys.executable)
FLAGS = ["--config", CONFIG, "--num-fid-samples", "4", "--per-proc-batch-size", "2",
         "--num-sampling-steps", "3"]
CORES_PER_RANK = max(1, len(os.sched_getaffinity(0)) // 2)


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["DICE_DS_CACHE_DIR"] = os.path.join(str(extra.pop("cwd")), "cache")
    return {**env, **extra}


def _run(cmd, cwd, **env):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cwd=cwd, **env), capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    info = json.load(open(os.path.join(cwd, "out", "run.json")))
    assert info["world_size"] == 2 and info["samples_run"] == 4 and len(info["per_rank"]) == 2
    return proc, info, np.load(os.path.join(cwd, "out", "latents.npz"))["arr_0"]


def _reference(tmp_path):
    """The same samples from one plain process (world size 1)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    cmd = [sys.executable, "-m", "dice_ds.sample", *FLAGS, "--sample-dir", "out"]
    proc = subprocess.run(cmd, cwd=ref, env=_env(cwd=ref, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(ref / "out" / "latents.npz")["arr_0"]


def test_deepspeed_launcher(tmp_path):
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port",
           str(29600 + os.getpid() % 300), "--module", "dice_ds.sample", *FLAGS,
           "--sample-dir", "out"]
    proc, info, lat = _run(cmd, tmp_path, DS_ACCELERATOR="cpu")
    assert [r["threads"] for r in info["per_rank"]] == [CORES_PER_RANK] * 2
    assert lat.shape == (4, 4, 8, 8) and np.array_equal(lat, _reference(tmp_path))
    assert "Setting accelerator" not in proc.stdout + proc.stderr  # filtered in main


def test_torchrun_ep_async(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dice_ds.sample", *FLAGS, "--ep", "--ep-async", "--sample-dir", "out"]
    proc, info, lat = _run(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert info["mode"] == "displaced" and info["bytes_exchanged"] > 0
    assert lat.shape == (4, 4, 8, 8) and np.isfinite(lat).all()
    out = proc.stdout + proc.stderr
    assert "Transformer Engine" not in out and "Warning" not in out  # quiet console
    assert "displaced on 2 rank(s)" in proc.stdout and "img/s" in proc.stdout


def test_launch_sh_sets_threads_per_rank(tmp_path):
    cmd = ["bash", os.path.join(ROOT, "scripts", "launch.sh"), *FLAGS, "--sample-dir", "out"]
    proc, info, lat = _run(cmd, tmp_path, NPROC="2", PYTHON=sys.executable)
    assert [r["threads"] for r in info["per_rank"]] == [CORES_PER_RANK] * 2
    assert lat.shape == (4, 4, 8, 8) and np.isfinite(lat).all()
    assert "Setting OMP_NUM_THREADS" not in proc.stderr  # launch.sh exported it, not torchrun


def test_slurm_dry_run_on_two_fake_nodes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="16",
               SLURM_SUBMIT_DIR=ROOT, NPROC="2", PYTHON=sys.executable,
               PATH="/usr/bin:/bin")  # no scontrol here: the script's own parser
    script = os.path.join(ROOT, "scripts", "slurm_sample.sbatch")
    proc = subprocess.run(["bash", script, "--dry-run", "--model", "debug"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "2 node(s) node01 node02, 2 rank(s) per node, MASTER_ADDR=node01" in lines[0]
    for rank, host in enumerate(("node01", "node02")):
        line = [ln for ln in lines if ln.startswith(f"node {rank} ({host}):")][0]
        assert "OMP_NUM_THREADS=8 " in line and f"--node_rank {rank} " in line
        assert "--nnodes 2" in line and "--master_addr node01" in line
        assert "--nproc_per_node 2 -m dice_ds.sample --model debug" in line
    # with scontrol on PATH, its host list is used
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho big-a\necho big-b\n")
    (fake / "scontrol").chmod(stat.S_IRWXU)
    env["PATH"] = f"{fake}:/usr/bin:/bin"
    proc = subprocess.run(["bash", script, "--model", "debug"], env={**env, "DRY_RUN": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "MASTER_ADDR=big-a" in proc.stdout and "node 1 (big-b)" in \
        proc.stdout, proc.stderr
