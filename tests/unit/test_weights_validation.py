"""Weights validated as they stream, and checkpoints that carry their architecture (issue 21).

dice_ds/weights/read.py refuses NaN/inf per region as it reads (and a cast that overflows the
model's dtype); check.py and load.py refuse integer tensors where the model has floating weights
(never cast); write.py and save.py record the architecture in the file's metadata and
``check_architecture`` refuses a file made for another model (heads included) or latent size,
and lists what it assumed for files without metadata.
"""
import os
import struct
import subprocess
import sys

import pytest
import torch

from dice_ds.config import ConfigError, get_flavor
from dice_ds.models import build_model
from dice_ds.weights.check import (
    architecture_metadata,
    check_architecture,
    check_complete,
    config_for_checkpoint,
)
from dice_ds.weights.load import CheckpointMismatchError, load_into_model, time_plain_read
from dice_ds.weights.read import NonFiniteWeightsError, open_checkpoint, read_state_dict
from dice_ds.weights.save import save_checkpoint
from dice_ds.weights.write import random_tensor, released_shapes, write_random_checkpoint

DEBUG = get_flavor("debug")
KEY = "blocks.1.moe.experts.2.up_proj.weight"


def _poke(path, key, index, value):
    """Overwrite element ``index`` of tensor ``key`` in a written file with ``value``."""
    with open_checkpoint(path) as reader:
        info = reader.infos[key]
    raw = torch.tensor([value], dtype=info.dtype).view(torch.uint8).numpy().tobytes()
    with open(path, "r+b") as fh:
        fh.seek(info.offset + index * info.dtype.itemsize)
        fh.write(raw)


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path, suffix, value):
    path = tmp_path / f"bad{suffix}"
    write_random_checkpoint(DEBUG, path, progress=False)
    _poke(path, KEY, 7, value)
    with open_checkpoint(path) as reader:  # the header is fine: refused only when read
        with pytest.raises(NonFiniteWeightsError, match=f"tensor {KEY} holds 1 NaN/inf value"):
            load_into_model(build_model(DEBUG), reader)
    with pytest.raises(ConfigError, match=KEY):
        read_state_dict(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_pos_embed_is_refused_in_a_cast_load(tmp_path, dtype):
    path = tmp_path / "pos.safetensors"
    write_random_checkpoint(DEBUG, path, dtype=dtype, progress=False)
    _poke(path, "pos_embed", 3, float("nan"))
    model = build_model(DEBUG, params_dtype=torch.float32 if dtype == torch.bfloat16 else
                        torch.bfloat16)  # a cast: the region passes through a scratch slot
    with open_checkpoint(path) as reader:
        with pytest.raises(NonFiniteWeightsError, match="tensor pos_embed"):
            load_into_model(model, reader)


def test_state_dict_with_inf_is_refused():
    sd = read_state_dict_of(DEBUG)
    sd["final_layer.linear.bias"][0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="final_layer.linear.bias"):
        load_into_model(build_model(DEBUG), sd)


def read_state_dict_of(cfg) -> dict[str, torch.Tensor]:
    """A released-layout state dict of ``cfg`` (what write.py writes, in memory: fresh tensors)."""
    return {k: random_tensor(cfg, k, s, 0) for k, s in released_shapes(cfg).items()}


def test_cast_overflowing_fp16_is_refused():
    sd = read_state_dict_of(DEBUG)
    sd[KEY][0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(NonFiniteWeightsError, match=f"tensor {KEY} holds values beyond"):
        load_into_model(build_model(DEBUG, params_dtype=torch.float16), sd)
    load_into_model(build_model(DEBUG, params_dtype=torch.bfloat16), sd)  # in bf16's range


def test_plain_read_does_not_check(tmp_path):
    path = tmp_path / "bad.safetensors"
    write_random_checkpoint(DEBUG, path, progress=False)
    _poke(path, KEY, 0, float("nan"))
    with open_checkpoint(path) as reader:
        assert time_plain_read(build_model(DEBUG), reader)["bytes"] > 0
        assert reader.check_finite  # restored


# ----------------------------------------------------------------------------- dtypes
def _retype(path, key, dtype_name):
    """Rewrite the header's dtype of ``key`` (same byte length), as a corrupt writer would."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    head = raw[8:8 + n].decode()
    at = head.index(f'"{key}"')
    start = head.index('"dtype":"', at) + len('"dtype":"')
    end = head.index('"', start)
    head = head[:start] + dtype_name + head[end:]
    head += " " * (n - len(head))
    path.write_bytes(struct.pack("<Q", n) + head.encode() + raw[8 + n:])


def test_i32_header_over_f32_bytes_is_refused(tmp_path):
    path = tmp_path / "i32.safetensors"
    write_random_checkpoint(DEBUG, path, progress=False)
    _retype(path, "blocks.0.attn.qkv.weight", "I32")
    with open_checkpoint(path) as reader:  # a well-formed file: the library opens it too
        shapes = reader.meta_state_dict()
        cfg = config_for_checkpoint(DEBUG, shapes)
        with pytest.raises(ConfigError, match="blocks.0.attn.qkv.weight is int32"):
            check_complete(shapes, cfg, str(path))
        with pytest.raises(CheckpointMismatchError, match="non-floating .*qkv.weight is int32"):
            load_into_model(build_model(cfg), reader)


def test_int64_tensor_where_a_float_is_expected_is_not_cast(tmp_path):
    sd = read_state_dict_of(DEBUG)
    sd["t_embedder.mlp.0.bias"] = torch.zeros(64, dtype=torch.int64)
    torch.save({"ema": sd}, tmp_path / "i64.pt")
    with open_checkpoint(tmp_path / "i64.pt") as reader:
        with pytest.raises(ConfigError, match="t_embedder.mlp.0.bias is int64"):
            check_complete(reader.meta_state_dict(), DEBUG, "i64.pt")
        with pytest.raises(CheckpointMismatchError, match="t_embedder.mlp.0.bias is int64"):
            load_into_model(build_model(DEBUG), reader)


# ----------------------------------------------------------------------------- identity
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_written_files_record_the_architecture(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    write_random_checkpoint(DEBUG, path, progress=False)
    with open_checkpoint(path) as reader:
        assert architecture_metadata(DEBUG).items() <= reader.metadata.items()
        assert reader.metadata["dice_ds.num_heads"] == "4"
        assert reader.metadata["dice_ds.learn_sigma"] == "true"
        assert check_architecture(reader, DEBUG) == []  # nothing assumed


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_file_for_8_heads_opened_for_4_heads_is_refused(tmp_path, suffix):
    path = tmp_path / f"h8{suffix}"
    write_random_checkpoint(DEBUG.replace(num_heads=8), path, progress=False)
    with open_checkpoint(path) as reader:
        cfg = config_for_checkpoint(DEBUG, reader.meta_state_dict())  # timm: shapes cannot tell
        with pytest.raises(ConfigError) as info:
            check_architecture(reader, cfg)
    line = str(info.value)
    assert "\n" not in line
    assert "made for num_heads=8" in line and "the run's model has num_heads=4" in line


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_exported_model_records_its_architecture(tmp_path, suffix):
    cfg = get_flavor("digits")
    path = save_checkpoint(build_model(cfg), tmp_path / f"e{suffix}")
    with open_checkpoint(path) as reader:
        assert reader.metadata["dice_ds.flavor"] == "digits"
        assert reader.metadata["dice_ds.attn_layout"] == "flash"
        assert check_architecture(reader, cfg) == []
        with pytest.raises(ConfigError, match="made for depth=4 .* has depth=3 .*--depth 4"):
            check_architecture(reader, cfg.replace(depth=3))


def test_released_file_without_metadata_states_its_assumptions(tmp_path):
    torch.save({"ema": read_state_dict_of(DEBUG)}, tmp_path / "released.pt")
    with open_checkpoint(tmp_path / "released.pt") as reader:
        assert reader.metadata == {}
        notes = check_architecture(reader, DEBUG)
        assert len(notes) == 2
        assert notes[0].startswith("num_heads=4 assumed from --model debug")
        assert notes[1].startswith("input_size=8 (latent side) read from pos_embed's 16 tokens")
        with pytest.raises(ConfigError, match="made for input_size=8 .* has input_size=16"):
            check_architecture(reader, DEBUG.replace(input_size=16))
        notes = check_architecture(reader, DEBUG.replace(input_size=16), regenerate_pos_embed=True)
        assert notes[0].startswith("pos_embed regenerated for input_size=16 (latent side): the "
                                   "checkpoint was made for input_size=8")
        assert notes[1].startswith("num_heads=4 assumed") and len(notes) == 2


def test_corrupt_architecture_metadata_is_one_line(tmp_path):
    sd = read_state_dict_of(DEBUG)
    torch.save({"ema": sd, "__metadata__": {"dice_ds.depth": "two"}}, tmp_path / "m.pt")
    with open_checkpoint(tmp_path / "m.pt") as reader:
        with pytest.raises(ConfigError, match="metadata dice_ds.depth='two' is not a valid depth"):
            check_architecture(reader, DEBUG)
    torch.save({"ema": sd, "__metadata__": {"dice_ds.depth": 2}}, tmp_path / "n.pt")
    with pytest.raises(ConfigError, match="'__metadata__' entry must map strings to strings"):
        open_checkpoint(tmp_path / "n.pt")


def test_cli_nan_weight_is_one_line_and_exit_2(tmp_path):
    """The NaN is found at load time, after the process group started (so not in the in-process
    table of docs/bad-inputs.md): still one line naming the tensor, exit code 2."""
    from bad_checkpoints import make_bad_checkpoints

    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "dice_ds", "assets",
                           "digits_dit_moe.pt")
    make_bad_checkpoints(tmp_path, read_state_dict(shipped))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "dice_ds.cli", "sample", "--model", "digits",
                           "--vae", "identity", "--ckpt", "nan.safetensors",
                           "--num-fid-samples", "1", "--sample-dir", "out"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("--ckpt nan.safetensors: tensor blocks.1.attn.out_proj.weight holds 1 NaN/inf "
            "value(s)") in lines[0]
