"""A checkpoint at XL/2 width loads under --ep on 2 ranks within the memory targets of docs/scale.md.

The test writes a random released-layout DiT-XL/2 checkpoint at depth 2 (full width, 1.19 GB in
fp32; ``dice_ds.weights.write``), samples 1 image per rank with 2 DDIM steps under torchrun with
``--ep --depth 2``, and reads what each rank measured of itself (run.json ``startup``): from just
before the model build to the end of the weight load, the resident set may grow by at most 1.3x
this rank's parameter bytes and its anonymous part by at most 1.1x (the whole model built first,
a second copy of the weights, or the mapped file kept resident would each break one of these).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_xl_width_checkpoint_loads_under_ep_within_the_memory_targets(tmp_path):
    from dice_ds.config import get_flavor
    from dice_ds.weights.write import write_random_checkpoint

    ckpt = tmp_path / "xl_d2.pt"
    write_random_checkpoint(get_flavor("DiT-XL/2").replace(depth=2), ckpt, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dice_ds.sample", "--model", "DiT-XL/2", "--depth", "2", "--ckpt", str(ckpt),
           "--ep", "--vae", "none", "--image-size", "256", "--sampler", "ddim",
           "--num-sampling-steps", "2", "--per-proc-batch-size", "1", "--num-fid-samples", "2",
           "--device", "cpu", "--sample-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.load(open(tmp_path / "out" / "run.json"))
    for r in info["per_rank"]:
        st = r["startup"]
        weights = st["param_bytes"]
        assert 0.6e9 < weights < 0.75e9  # 2 blocks' dense weights + 4 of 8 experts, fp32
        assert st["bytes_read"] == weights  # exactly this rank's tensors, each once
        before = st["memory_before_build"]
        during = {k: max(st["peak_bytes"][p][k] for p in ("model_build", "weight_load"))
                  for k in ("rss", "anon")}
        assert during["rss"] - before["rss"] <= 1.3 * weights, (during, before, weights)
        assert during["anon"] - before["anon"] <= 1.1 * weights, (during, before, weights)
        assert st["checkpoint_reader"] == "torch-zip"
