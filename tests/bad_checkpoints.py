"""Malformed checkpoints for docs/bad-inputs.md's rows (made by tests/unit/test_bad_inputs.py).

Each file is a valid ``.safetensors`` of the shipped digits model with one defect that
dice_ds/weights refuses: overlapping byte ranges, bytes appended after the last tensor, a repeated
key, a dtype that says I32 over F32 bytes, ``__metadata__`` that is not a string map, a NaN weight;
and a debug-model checkpoint written for 8 heads (its metadata says so; the debug flavor has 4).
"""
import json
import struct

import torch
from safetensors.torch import save_file

from dice_ds.config import get_flavor
from dice_ds.weights.write import write_random_checkpoint


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(text: str, data: bytes) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode() + data


def make_bad_checkpoints(d, sd: dict[str, torch.Tensor]) -> None:
    """Write the files named in the module doc into directory ``d`` from state dict ``sd``."""
    sd = {k: v.float().contiguous() for k, v in sd.items()}  # F32 bytes (the shipped file: bf16)
    save_file(sd, str(d / "ok.safetensors"))
    raw = (d / "ok.safetensors").read_bytes()
    header, data = _split(raw)
    key = "blocks.1.attn.out_proj.weight"
    shifted = json.loads(json.dumps(header))
    lo, hi = shifted[key]["data_offsets"]
    shifted[key]["data_offsets"] = [lo - 4, hi - 4]  # starts inside its neighbour
    (d / "overlap.safetensors").write_bytes(_join(json.dumps(shifted), data))
    (d / "appended.safetensors").write_bytes(raw + b"trailing garbage")
    text = json.dumps(header)
    dup = text[:-1] + ", " + json.dumps(key) + ": " + json.dumps(header[key]) + "}"
    (d / "dup_key.safetensors").write_bytes(_join(dup, data))
    retyped = json.loads(json.dumps(header))
    retyped[key]["dtype"] = "I32"
    (d / "i32.safetensors").write_bytes(_join(json.dumps(retyped), data))
    meta = json.loads(json.dumps(header))
    meta["__metadata__"] = {"format": "pt", "epoch": 3}
    (d / "bad_meta.safetensors").write_bytes(_join(json.dumps(meta), data))
    nan = dict(sd)
    nan[key] = sd[key].clone()
    nan[key][0, 0] = float("nan")
    save_file(nan, str(d / "nan.safetensors"))
    write_random_checkpoint(get_flavor("debug").replace(num_heads=8), d / "heads8.safetensors",
                            progress=False)
    (d / "ok.safetensors").unlink()
