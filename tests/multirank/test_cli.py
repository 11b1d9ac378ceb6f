"""The real command line under torchrun: a 2-rank run, a failing rank, and bad input."""
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "ds", "debug_dp.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, cwd, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dice_ds.sample", "--config", CONFIG, *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def test_torchrun_two_ranks_write_a_sample_dir(tmp_path):
    proc, _ = torchrun("--num-fid-samples", "6", "--num-sampling-steps", "5", "--sample-dir", "out",
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.load(open(tmp_path / "out" / "run.json"))
    assert info["world_size"] == 2 and info["num_samples"] == 6 and info["num_steps"] == 5
    assert info["sampling_seconds"] > 0 and len(info["per_rank"]) == 2
    lat = np.load(tmp_path / "out" / "latents.npz")["arr_0"]
    assert lat.shape == (6, 4, 8, 8) and np.isfinite(lat).all()


def test_a_failing_rank_ends_the_whole_run_promptly(tmp_path):
    # rank 1's first latent file cannot be written (a directory is in the way); rank 0 succeeds and
    # would then wait for rank 1 in the final gather until the 30-minute process-group timeout
    os.makedirs(tmp_path / "out" / "latents" / "000001.npy")
    proc, seconds = torchrun("--num-sampling-steps", "5", "--sample-dir", "out", cwd=tmp_path)
    assert proc.returncode != 0
    assert "[rank 1] dice-ds sample failed" in proc.stderr and "IsADirectoryError" in proc.stderr
    assert seconds < 90  # process start dominates; a hang would last 30 minutes
    assert not (tmp_path / "out" / "run.json").exists()


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
    for flags, needle in ((["--model", "DiT-Q/2"], "unknown model"),
                          (["--ep-async"], "(--ep-async) needs expert parallelism")):
        proc = subprocess.run([sys.executable, "-m", "dice_ds.cli", "sample", "--config", CONFIG,
                               *flags], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len([ln for ln in proc.stderr.splitlines() if "error" in ln]) == 1


def test_a_shipped_config_from_another_directory_with_a_regenerated_pos_embed(tmp_path):
    """``--config configs/ds/digits_ep_sync.json`` from a directory without the package's files
    (the config names ``shipped:digits``), at another image size than the checkpoint's: the
    replaced ``pos_embed`` is stated once (rank 0, no per-rank warning) and recorded in run.json
    and the fingerprint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dice_ds.sample", "--config", os.path.join(ROOT, "configs", "ds",
                                                          "digits_ep_sync.json"),
           "--image-size", "32", "--regenerate-pos-embed", "--num-fid-samples", "2",
           "--per-proc-batch-size", "1", "--num-sampling-steps", "2", "--sample-dir", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("dice-ds: note: --ckpt")]
    assert len([n for n in notes if "pos_embed regenerated for input_size=32" in n]) == 1, notes
    assert "UserWarning" not in proc.stderr, proc.stderr[-3000:]
    info = json.load(open(tmp_path / "out" / "run.json"))
    assert info["regenerated_pos_embed"] is True and info["image_size"] == 32
    assert info["checkpoint_notes"][0].startswith("pos_embed regenerated for input_size=32")
    assert info["fingerprint"]["regenerated_pos_embed"] is True
