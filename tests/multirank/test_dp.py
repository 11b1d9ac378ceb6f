"""Data parallelism: a 2-rank run writes byte-identical images to a 1-rank run with the same seed."""
import json
import os

import numpy as np

from distributed import run_ranks


def tiny_vae(path):
    from diffusers.models import AutoencoderKL

    AutoencoderKL(block_out_channels=[32] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1,
                  norm_num_groups=8).save_pretrained(str(path))
    return str(path)


def _flags(sample_dir, vae):
    # DDPM: the per-step noise must also follow the sample, not the rank or the batch
    return ["--model", "debug", "--init", "random", "--vae", "sd", "--vae-path", vae,
            "--sampler", "ddpm", "--num-sampling-steps", "6", "--cfg-scale", "2",
            "--num-fid-samples", "7", "--per-proc-batch-size", "2", "--global-seed", "11",
            "--sample-dir", sample_dir, "--device", "cpu"]


def _sample(rank, world, flags):
    from dice_ds.options import parse_options
    from dice_ds.sample.job import prepare, run

    info = run(prepare(parse_options(flags), world_size=world))
    return None if info is None else {k: info[k] for k in ("world_size", "batches_run", "per_rank")}


def _pngs(d):
    sd = os.path.join(d, "samples")
    return {f: open(os.path.join(sd, f), "rb").read() for f in sorted(os.listdir(sd))}


def test_two_ranks_write_the_same_images_as_one(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    one, two = str(tmp_path / "w1"), str(tmp_path / "w2")
    (r1,) = run_ranks(_sample, 1, tmp_path, _flags(one, vae))
    r2 = run_ranks(_sample, 2, tmp_path, _flags(two, vae))
    assert r1["world_size"] == 1 and r1["batches_run"] == 4  # 7 samples, 2 per batch
    assert r2[0]["world_size"] == 2 and r2[0]["batches_run"] == 2 and r2[1] is None
    assert [r["rank"] for r in r2[0]["per_rank"]] == [0, 1]
    a, b = _pngs(one), _pngs(two)
    assert list(a) == [f"{i:06d}.png" for i in range(7)] and a == b
    npz1, npz2 = np.load(os.path.join(one, "samples.npz")), np.load(os.path.join(two, "samples.npz"))
    assert np.array_equal(npz1["arr_0"], npz2["arr_0"]) and npz1["arr_0"].shape == (7, 64, 64, 3)
    assert np.array_equal(npz1["labels"], npz2["labels"])
    assert len({img.tobytes() for img in npz1["arr_0"]}) == 7  # every sample differs
    run_json = json.load(open(os.path.join(two, "run.json")))
    assert run_json["world_size"] == 2 and run_json["mode"] == "dp" and run_json["sampler"] == "ddpm"


def _latents(rank, world, flags):
    from dice_ds.options import parse_options
    from dice_ds.sample.job import prepare, run

    info = run(prepare(parse_options(flags), world_size=world))
    return None if info is None else (info["mode"], info["ep_size"])


def test_sync_ep_run_writes_the_same_latents_as_a_single_process(tmp_path):
    flags = ["--model", "debug", "--init", "random", "--vae", "none", "--num-sampling-steps", "4",
             "--num-fid-samples", "6", "--per-proc-batch-size", "3", "--device", "cpu"]
    (one,) = run_ranks(_latents, 1, tmp_path, flags + ["--sample-dir", str(tmp_path / "a")])
    ep = run_ranks(_latents, 2, tmp_path, flags + ["--sample-dir", str(tmp_path / "b"), "--ep"])
    assert one == ("dp", 1) and ep[0] == ("ep", 2)
    a = np.load(tmp_path / "a" / "latents.npz")["arr_0"]
    b = np.load(tmp_path / "b" / "latents.npz")["arr_0"]
    assert a.shape == (6, 4, 8, 8) and np.array_equal(a, b)
