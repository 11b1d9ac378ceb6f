"""``dice-ds sample --sp`` under torchrun (2 ranks): the same images as data parallelism.

One DP run and two SP runs of the debug model with the same seed: sync SP must write DP's latents
for every index (fp32, <= 1e-5), displaced SP finite latents for the same indices; run.json carries
the SP stats (bytes exchanged, K/V buffer bytes). ``--single-img`` and EP x SP are tested in-process
at 4 ranks (tests/multirank/test_sp.py).
"""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "ds", "debug_dp.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMON = ["--num-fid-samples", "6", "--per-proc-batch-size", "2", "--num-sampling-steps", "3"]


def _run(name, *flags, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dice_ds.sample", "--config", CONFIG, *COMMON, "--sample-dir", name, *flags]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(cwd / name / "latents.npz") as f:
        lat = f["arr_0"]
    return lat, json.load(open(cwd / name / "run.json"))


def test_sp_modes_write_dp_images(tmp_path):
    dp, _ = _run("dp", cwd=tmp_path)
    sp, info = _run("sp", "--sp", cwd=tmp_path)
    df, info_df = _run("df", "--sp", "--sp-async", cwd=tmp_path)
    assert dp.shape == sp.shape == df.shape == (6, 4, 8, 8)
    assert np.abs(sp - dp).max() <= 1e-5
    assert np.isfinite(df).all() and np.abs(df - dp).max() > 0  # stale K/V change the output
    assert info["mode"] == "sp" and info["sp_size"] == 2 and info["sp_kv_buffer_bytes"] == 0
    assert info["sp_kv_bytes_exchanged"] > 0 and info["sp_kv_bytes_exchanged_async"] == 0
    assert info_df["mode"] == "displaced_sp"
    assert info_df["sp_kv_buffer_bytes"] > 0 and info_df["sp_kv_bytes_exchanged_async"] > 0
