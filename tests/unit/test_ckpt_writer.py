"""dice_ds.weights.write: released shapes, both file formats, determinism, dice-ds make-checkpoint."""
import collections
import json
import struct
import zipfile

import pytest
import torch

from dice_ds.cli import main as cli_main
from dice_ds.config import get_flavor
from dice_ds.models import build_model
from dice_ds.weights.check import check_complete, expected_keys, inspect_checkpoint
from dice_ds.weights.load import load_into_model
from dice_ds.weights.read import open_checkpoint, read_state_dict
from dice_ds.weights.save import export_released_state_dict
from dice_ds.weights.write import (
    file_metadata,
    random_tensor,
    released_shapes,
    torch_data_pkl,
    write_random_checkpoint,
)

DEBUG = get_flavor("debug")
DIGITS = get_flavor("digits")
# flavor, depth override, device for build_model ("meta": shapes only, no memory)
SHAPE_CASES = [("debug", None, "cpu"), ("digits", None, "cpu"), ("DiT-S/2", 1, "meta"),
               ("DiT-B/2", 1, "meta"), ("DiT-XL/2", 1, "meta"), ("DiT-G/2", 1, "meta"),
               ("DiT-XL/2", 2, "meta")]


def _cfg(name, depth=None, **changes):
    cfg = get_flavor(name)
    return cfg.replace(**({"depth": depth} if depth else {}), **changes)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("impl", ["grouped", "sequential"])
@pytest.mark.parametrize("name,depth,device", SHAPE_CASES)
def test_shapes_equal_the_exported_model(name, depth, device, impl):
    cfg = _cfg(name, depth, experts_impl=impl)
    exported = export_released_state_dict(build_model(cfg, device=device))
    shapes = released_shapes(cfg)
    assert list(shapes) == expected_keys(cfg)
    assert set(exported) == set(shapes)
    assert {k: tuple(v.shape) for k, v in exported.items()} == shapes


def test_shapes_other_expert_count_and_image_size():
    cfg = _cfg("DiT-XL/2", 3, num_experts=16, input_size=64)
    shapes = released_shapes(cfg)
    assert shapes["blocks.2.moe.gate.weight"] == (16, 1152)
    assert shapes["blocks.2.moe.experts.15.down_proj.weight"] == (1152, 4608)
    assert shapes["blocks.0.moe.shared_experts.up_proj.weight"] == (2304, 1152)
    assert shapes["blocks.1.attn.q_norm.bias"] == (72,)
    assert shapes["pos_embed"] == (1, 1024, 1152)
    assert shapes["final_layer.linear.weight"] == (32, 1152)


def test_data_pkl_is_what_torch_save_writes(tmp_path):
    shapes = released_shapes(DIGITS)
    meta = file_metadata(DIGITS, 3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sd = collections.OrderedDict((k, torch.zeros(s, dtype=dtype)) for k, s in shapes.items())
        torch.save({"ema": sd}, tmp_path / "ref.pt")
        with zipfile.ZipFile(tmp_path / "ref.pt") as zf:
            assert zf.read("ref/data.pkl") == torch_data_pkl(shapes, dtype)
        torch.save({"ema": sd, "__metadata__": meta}, tmp_path / "ref.pt")  # what write.py writes
        with zipfile.ZipFile(tmp_path / "ref.pt") as zf:
            assert zf.read("ref/data.pkl") == torch_data_pkl(shapes, dtype, meta)


# ----------------------------------------------------------------------------- round trips
def _expected(cfg, dtype, seed=0):
    return {k: random_tensor(cfg, k, s, seed).to(dtype) for k, s in released_shapes(cfg).items()}


def _assert_equal(sd, want):
    assert set(sd) == set(want)
    for k, v in want.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k


def _torch_records_aligned(path):
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            fh.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", fh.read(4))
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
            assert info.compress_type == zipfile.ZIP_STORED
        names = [i.filename for i in zf.infolist()]
        assert names[0] == f"{path.stem}/data.pkl" and f"{path.stem}/byteorder" in names
        assert zf.read(f"{path.stem}/version") == b"3\n"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
@pytest.mark.parametrize("name,dtype", [("digits", torch.float32), ("debug", torch.bfloat16),
                                        ("DiT-S/2", torch.float16)])
def test_round_trip(tmp_path, name, dtype, suffix):
    cfg = _cfg(name, 1 if name.startswith("DiT") else None)
    path = tmp_path / f"ckpt{suffix}"
    info = write_random_checkpoint(cfg, path, dtype=dtype, seed=3, progress=False)
    assert not (tmp_path / f"ckpt{suffix}.tmp").exists()
    assert info["path"] == str(path) and info["bytes"] == path.stat().st_size
    assert info["num_tensors"] == len(expected_keys(cfg))
    assert info["params"] == sum(v.numel() for v in _expected(cfg, dtype, 3).values())
    want = _expected(cfg, dtype, seed=3)
    sd = read_state_dict(path)
    _assert_equal(sd, want)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert f.metadata()["model"] == cfg.name
            assert f.metadata()["dice_ds.num_heads"] == str(cfg.num_heads)
            assert torch.equal(f.get_tensor("pos_embed"), want["pos_embed"])
    else:
        _assert_equal(torch.load(path, weights_only=True)["ema"], want)
        assert torch.load(path, weights_only=True)["__metadata__"] == file_metadata(cfg, 3)
        _assert_equal(torch.load(path, mmap=True, weights_only=True)["ema"], want)
        _torch_records_aligned(path)
    check_complete(sd, cfg, str(path))
    facts = inspect_checkpoint(sd)
    assert (facts["depth"], facts["num_experts"], facts["attn_layout"]) == (
        cfg.depth, cfg.num_experts, cfg.attn_layout)
    with open_checkpoint(path) as reader:  # the streaming reader a run uses
        check_complete(reader.meta_state_dict(), cfg, str(path))
        assert torch.equal(reader.read("blocks.0.moe.gate.weight"), want["blocks.0.moe.gate.weight"])


def test_values():
    a = random_tensor(DIGITS, "blocks.0.moe.experts.1.up_proj.weight", (256, 64), 0)
    b = random_tensor(DIGITS, "blocks.0.moe.experts.2.up_proj.weight", (256, 64), 0)
    assert a.dtype == torch.float32 and not torch.equal(a, b)
    assert abs(a.std().item() - 0.02) < 0.002 and abs(a.mean().item()) < 0.002
    norm = random_tensor(DIGITS, "blocks.3.attn.k_norm.weight", (4096,), 0)
    assert abs(norm.mean().item() - 1.0) < 0.002
    from dice_ds.models.layers import sincos_pos_embed_2d

    pos = random_tensor(DIGITS, "pos_embed", (1, 64, 64), 0)
    assert torch.equal(pos[0], sincos_pos_embed_2d(64, 8))


@pytest.mark.parametrize("name", ["debug", "digits"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_loads_into_built_model(tmp_path, name, suffix):
    cfg = get_flavor(name)
    path = tmp_path / f"m{suffix}"
    write_random_checkpoint(cfg, path, progress=False)
    model = build_model(cfg)
    with open_checkpoint(path) as reader:
        load_into_model(model, reader)
    _assert_equal(export_released_state_dict(model), _expected(cfg, torch.float32))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bf16_is_half_the_size(tmp_path, suffix):
    fp32 = write_random_checkpoint(DIGITS, tmp_path / f"a{suffix}", progress=False)["bytes"]
    bf16 = write_random_checkpoint(DIGITS, tmp_path / f"b{suffix}", dtype=torch.bfloat16,
                                   progress=False)["bytes"]
    assert 0.5 < bf16 / fp32 < 0.51


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_deterministic(tmp_path, suffix):
    paths = [tmp_path / d / f"ckpt{suffix}" for d in ("a", "b", "c")]
    for path, seed in zip(paths, (5, 5, 6)):
        path.parent.mkdir()
        write_random_checkpoint(DEBUG, path, seed=seed, progress=False)
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b and a != c


def test_safetensors_header_layout(tmp_path):
    path = tmp_path / "h.safetensors"
    write_random_checkpoint(DEBUG, path, dtype=torch.float16, progress=False)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert {v["dtype"] for v in header.values()} == {"F16"}


# ----------------------------------------------------------------------------- the command line
def _cli(args, capsys):
    try:
        code = cli_main(["make-checkpoint", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes(tmp_path, capsys):
    out = tmp_path / "xl.safetensors"
    code, stdout, _ = _cli(["--model", "XL/2", "--depth", "1", "--num-experts", "2",
                            "--image-size", "128", "--dtype", "bf16", "--out", str(out),
                            "--no-progress"], capsys)
    assert code == 0 and stdout.startswith(f"wrote {out}: ") and "params" in stdout
    facts = inspect_checkpoint(read_state_dict(out))
    assert (facts["depth"], facts["num_experts"], facts["input_size"]) == (1, 2, 16)
    code, stdout, _ = _cli(["--model", "digits", "--image-size", "512", "--out", str(out),
                            "--overwrite", "--no-progress"], capsys)
    assert code == 0 and inspect_checkpoint(read_state_dict(out))["input_size"] == 16


@pytest.mark.parametrize("args,flag", [
    (["--model", "DiT-Q/2"], "--model"),
    (["--model", "XL/2", "--depth", "0"], "--depth"),
    (["--model", "XL/2", "--num-experts", "1"], "--num-experts"),
    (["--model", "XL/2", "--image-size", "100"], "--image-size"),
    (["--model", "XL/2", "--depth", "two"], "--depth"),
    (["--model", "debug", "--dtype", "fp8"], "--dtype"),
])
def test_cli_bad_flags(tmp_path, capsys, args, flag):
    code, stdout, err = _cli([*args, "--out", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and stdout == ""
    assert err.startswith("dice-ds make-checkpoint: error: ") and err.count("\n") == 1
    assert flag in err
    assert not list(tmp_path.iterdir())


def test_cli_bad_outputs(tmp_path, capsys, monkeypatch):
    def error(out, *more):
        code, _, err = _cli(["--model", "debug", "--out", str(out), *more], capsys)
        assert code == 2 and err.startswith("dice-ds make-checkpoint: error: --out ")
        assert err.count("\n") == 1
        return err

    assert ".safetensors, .pt or .pth" in error(tmp_path / "x.bin")
    assert "create it first" in error(tmp_path / "missing" / "x.pt")
    (tmp_path / "old.pt").write_bytes(b"old")
    assert "--overwrite" in error(tmp_path / "old.pt")
    assert (tmp_path / "old.pt").read_bytes() == b"old"
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 10))
    assert "GB free" in error(tmp_path / "new.pt")
    assert not (tmp_path / "new.pt").exists()
