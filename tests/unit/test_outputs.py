"""Sample directory: index formula, atomic files, npz/grid/run.json assembly, resuming a run."""
import json
import os

import numpy as np
import pytest

from dice_ds.outputs import SampleDir, batch_indices, num_batches, sample_index


def tiny_vae(path):
    """A random diffusers AutoencoderKL with the SD layout (x8 upsampling, 4 latent channels)."""
    from diffusers.models import AutoencoderKL

    AutoencoderKL(block_out_channels=[32] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1,
                  norm_num_groups=8).save_pretrained(str(path))
    return str(path)


def test_index_formula_is_the_references():
    # batch b, local i, rank r, W ranks, n per rank: b*n*W + i*W + r
    assert sample_index(0, 0, 1, 2, 3) == 1 and sample_index(0, 2, 1, 2, 3) == 5
    assert sample_index(2, 1, 0, 4, 8) == 2 * 32 + 4
    for w, n in ((1, 4), (2, 3), (4, 2)):
        for b in range(3):
            got = sorted(i for r in range(w) for i in batch_indices(b, r, w, n))
            assert got == list(range(b * n * w, (b + 1) * n * w))
    assert num_batches(10, 2, 3) == 2 and num_batches(12, 2, 3) == 2 and num_batches(13, 2, 3) == 3


def test_images_are_written_atomically_and_assembled_in_index_order(tmp_path):
    out = SampleDir(str(tmp_path / "run")).create()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    out.write_images([4, 0, 2], imgs[[4, 0, 2]])
    assert out.has_all([0, 2, 4]) and not out.has_all([0, 1])
    out.write_images([1, 3], imgs[[1, 3]])
    assert sorted(os.listdir(out.item_dir)) == [f"{i:06d}.png" for i in range(5)]  # no temp files
    path = out.assemble(list(range(5)), [7, 1, 2, 3, 4])
    data = np.load(path)
    assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], imgs)
    assert data["labels"].tolist() == [7, 1, 2, 3, 4]
    grid = out.write_grid(list(range(5)))
    from PIL import Image

    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)
    info = json.load(open(out.write_run_json({"a": 1, "b": [1.5]})))
    assert info == {"a": 1, "b": [1.5]}


def test_latents_only_directory(tmp_path):
    out = SampleDir(str(tmp_path / "lat"), latents_only=True).create()
    lat = np.random.default_rng(1).standard_normal((3, 4, 2, 2)).astype(np.float32)
    out.write_latents([0, 1, 2], lat)
    data = np.load(out.assemble([0, 1, 2], [0, 0, 1]))
    assert np.array_equal(data["arr_0"], lat) and out.write_grid([0, 1, 2]) is None


def _run(sample_dir, vae_path, *extra):
    from dice_ds.options import parse_options
    from dice_ds.sample.job import prepare, run

    flags = ["--model", "debug", "--init", "random", "--vae", "sd", "--vae-path", vae_path,
             "--num-fid-samples", "5", "--per-proc-batch-size", "2", "--num-sampling-steps", "4",
             "--sample-dir", str(sample_dir), "--device", "cpu", *extra]
    return run(prepare(parse_options(flags), world_size=1))


def _files(d):
    return {f: open(os.path.join(d, "samples", f), "rb").read()
            for f in sorted(os.listdir(os.path.join(d, "samples")))}


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    full = tmp_path / "full"
    info = _run(full, vae)
    assert info["batches_run"] == 3 and info["world_size"] == 1 and info["num_samples"] == 5
    ref = _files(full)
    assert list(ref) == [f"{i:06d}.png" for i in range(5)]
    npz = np.load(full / "samples.npz")["arr_0"]
    assert npz.shape == (5, 64, 64, 3) and npz.std() > 0
    # an interrupted run: batch 1 (indices 2, 3) lost one file, nothing assembled yet
    part = tmp_path / "part"
    os.makedirs(part / "samples")
    for name in ("000000.png", "000001.png", "000002.png", "000004.png"):
        (part / "samples" / name).write_bytes(ref[name])
    (part / "fingerprint.json").write_bytes((full / "fingerprint.json").read_bytes())
    info = _run(part, vae)
    assert info["batches_run"] == 1 and len(info["batch_sampling_seconds"]) == 1
    assert _files(part) == ref
    assert np.array_equal(np.load(part / "samples.npz")["arr_0"], npz)
    run_json = json.load(open(part / "run.json"))
    for key in ("model", "mode", "world_size", "num_steps", "num_samples", "sampling_seconds",
                "peak_memory_bytes", "args"):
        assert key in run_json
    assert run_json["mode"] == "dp" and run_json["num_steps"] == 4 and run_json["peak_memory_bytes"] > 0
    # a complete directory: nothing is sampled and the measurements of the real run are kept
    again = _run(part, vae)
    assert again["already_complete"] and again["batches_run"] == 1
    assert json.load(open(part / "run.json")) == run_json


def test_trimmed_run_writes_one_image_per_batch(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    info = _run(tmp_path / "t", vae, "--trim-samples")
    assert sorted(os.listdir(tmp_path / "t" / "samples")) == ["000000.png", "000002.png",
                                                              "000004.png"]
    assert "npz" not in info and info["grid"]


@pytest.mark.parametrize("size", [48])
def test_sd_vae_output_size_follows_the_image_size(tmp_path, size):
    vae = tiny_vae(tmp_path / "vae")
    _run(tmp_path / "s", vae, "--image-size", str(size), "--num-fid-samples", "1")
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (1, size, size, 3)


def test_pixel_conversion_follows_the_reference_formula():
    import torch

    from dice_ds.config import ConfigError
    from dice_ds.vae import IdentityDecoder, to_uint8_nhwc

    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6)
    img = to_uint8_nhwc(x)  # clamp(127.5 x + 128, 0, 255), truncated, 1 channel -> RGB
    assert img.shape == (1, 1, 6, 3) and img.dtype == np.uint8
    assert img[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255] and (img[..., 0] == img[..., 2]).all()
    assert IdentityDecoder(3).decode(torch.zeros(2, 3, 4, 4)).shape == (2, 4, 4, 3)
    with pytest.raises(ConfigError, match="1 or 3 image channels"):
        IdentityDecoder(4)
