"""Random DiT-MoE checkpoints at real size, in the released key layout, written in bounded memory.

Owns ``write_random_checkpoint(cfg, path, ...)``, the ``dice-ds make-checkpoint`` command (``main``:
flags -> ``ModelConfig``, output and free-space checks, one-line errors, exit 2) and what it is made
of: ``released_shapes(cfg)`` (the released name -> shape table, the keys of
``dice_ds/weights/check.py``'s ``expected_keys``), ``random_tensor(cfg, key, shape, seed)`` (the value of one
tensor, a function of the seed and the key name alone) and the two file formats, both written here
byte by byte rather than through ``safetensors.torch.save_file`` / ``torch.save`` (which need the
whole state dict in memory):

- ``.safetensors``: 8-byte little-endian header length, the JSON header (every dtype, shape and
  byte range, computed from the shapes up front, space-padded to a multiple of 8; its
  ``__metadata__`` records the architecture: ``file_metadata``), the raw bytes;
- ``.pt``/``.pth``: torch's zip format as ``torch.save({"ema": sd, "__metadata__": meta}, path)``
  lays it out (``meta``: the same strings as the safetensors metadata)
  (``torch/serialization.py``: ``_save``): ``<stem>/data.pkl`` (pickled from the shapes, each tensor
  a ``torch._utils._rebuild_tensor_v2`` call on a persistent storage id), ``.format_version``,
  ``.storage_alignment``, ``byteorder``, one stored (uncompressed) record ``data/<n>`` per tensor
  whose bytes start on a 64-byte boundary (padding in the local header's extra field, as torch
  pads), ``version`` and ``.data/serialization_id``.

Invariants: at most two tensors are in memory at a time (the one being written and the next one,
generated in fp32 and cast on a worker thread), so resident memory does not grow with depth or
expert count (measured: XL/2 at depth 2, 4 and 28 all peak at ~0.33 GB resident, most of it
torch itself); the file appears atomically (written to ``<path>.tmp``, then ``os.replace``); the
same (cfg, dtype, seed) gives identical bytes.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from dice_ds.config import ConfigError, ModelConfig, get_flavor
from dice_ds.models.layers import sincos_pos_embed_2d
from dice_ds.weights.check import architecture_metadata, expected_keys
from dice_ds.weights.read import METADATA_KEY

STD = 0.02
"""Standard deviation of every random weight and bias (norm weights: 1 + N(0, STD))."""
SUFFIXES = (".safetensors", ".pt", ".pth")
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_STORAGE_TYPE = {torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage",
                 torch.float16: "HalfStorage"}
_ALIGN = 64  # torch's storage alignment inside the zip (``.storage_alignment``)
_PAD_FIELD = 0x4246  # "FB": the extra-field id torch's zip writer pads records with
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------- shapes and values
def _block_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one block's tensors, keyed by the name after ``blocks.<b>.``."""
    d, f, fs, hd = cfg.hidden_size, cfg.expert_ffn_size, cfg.shared_ffn_size, cfg.head_dim
    out = {"adaLN_modulation.1.weight": (6 * d, d), "adaLN_modulation.1.bias": (6 * d,),
           "moe.gate.weight": (cfg.num_experts, d)}
    if cfg.attn_layout == "flash":
        out.update({"attn.Wqkv.weight": (3 * d, d), "attn.Wqkv.bias": (3 * d,),
                    "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,)})
        out.update({f"attn.{n}_norm.{w}": (hd,) for n in "qk" for w in ("weight", "bias")})
    else:
        out.update({"attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                    "attn.proj.weight": (d, d), "attn.proj.bias": (d,)})
    out.update({f"moe.shared_experts.{k}": s for k, s in _swiglu(d, fs).items()})
    out.update({f"moe.experts.{e}.{k}": s for e in range(cfg.num_experts)
                for k, s in _swiglu(d, f).items()})
    return out


def _swiglu(d: int, f: int) -> dict[str, tuple[int, int]]:
    return {"gate_proj.weight": (f, d), "up_proj.weight": (f, d), "down_proj.weight": (d, f)}


def released_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a released-layout checkpoint of ``cfg``, in ``expected_keys`` order."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    top = {
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, d),
        "pos_embed": (1, cfg.num_tokens, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (p * p * cfg.out_channels, d),
        "final_layer.linear.bias": (p * p * cfg.out_channels,),
    }
    block = _block_shapes(cfg)
    out = {}
    for key in expected_keys(cfg):
        if key in top:
            out[key] = top[key]
        else:
            _, _, rest = key.split(".", 2)  # blocks.<b>.<rest>
            out[key] = block[rest]
    return out


def key_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from (seed, key): stable across runs and machines (sha256)."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_tensor(cfg: ModelConfig, key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fp32 value of ``key``: the sin-cos table for ``pos_embed``, 1 + N(0, STD) for the
    q/k norm weights, N(0, STD) for everything else (weights and biases)."""
    if key == "pos_embed":
        grid = cfg.input_size // cfg.patch_size
        return sincos_pos_embed_2d(cfg.hidden_size, grid).reshape(shape).contiguous()
    gen = torch.Generator().manual_seed(key_seed(seed, key))
    out = torch.empty(shape, dtype=torch.float32).normal_(0.0, STD, generator=gen)
    if key.endswith(("q_norm.weight", "k_norm.weight")):
        out += 1.0
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def data_nbytes(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of tensor data in a checkpoint of ``cfg`` (the file adds headers: well under 1 MiB
    per 1000 tensors)."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum(_numel(s) for s in released_shapes(cfg).values()) * item


def _generated(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
               seed: int):
    """(key, tensor in ``dtype``) in ``shapes`` order. The next tensor is generated on a worker
    thread while the caller writes this one (both release the GIL), so at most two tensors exist
    at a time."""

    def make(key):
        return random_tensor(cfg, key, shapes[key], seed).to(dtype)

    keys = list(shapes)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-gen") as pool:
        pending = pool.submit(make, keys[0]) if keys else None
        for i, key in enumerate(keys):
            tensor = pending.result()
            pending = pool.submit(make, keys[i + 1]) if i + 1 < len(keys) else None
            yield key, tensor
            del tensor


def file_metadata(cfg: ModelConfig, seed: int) -> dict[str, str]:
    """The string metadata of a written checkpoint: the architecture
    (``dice_ds/weights/check.py``'s ``architecture_metadata``: what ``check_architecture``
    compares with a run's model), the seed and the writer."""
    return {"format": "pt", "model": cfg.name, "seed": str(seed),
            "writer": "dice_ds.weights.write", **architecture_metadata(cfg)}


def _raw(t: torch.Tensor):
    """A zero-copy little-endian byte view of a contiguous CPU tensor (any dtype)."""
    return t.reshape(-1).view(torch.uint8).numpy()


# ----------------------------------------------------------------------------- .safetensors
def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                       metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus the space-padded JSON header of a file holding ``shapes`` in
    ``dtype``, tensors laid out back to back in the order given."""
    item = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, shape in shapes.items():
        end = offset + _numel(shape) * item
        header[key] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                       "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_safetensors(fh, cfg, shapes, dtype, seed, bar) -> None:
    fh.write(safetensors_header(shapes, dtype, file_metadata(cfg, seed)))
    for _, tensor in _generated(cfg, shapes, dtype, seed):
        fh.write(_raw(tensor))
        bar.update(1)


# ----------------------------------------------------------------------------- .pt (torch zip)
class _Storage:
    """Stands for one storage in data.pkl; pickled as torch's persistent id (see ``_Pickler``)."""

    def __init__(self, dtype: torch.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _Tensor:
    """Stands for one contiguous tensor; pickles as ``torch.Tensor.__reduce_ex__`` does on CPU."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(list(shape))  # a fresh tuple: as torch, no memo

    def __reduce__(self):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False,
                 collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE_TYPE[obj.dtype]), obj.key, "cpu",
                    obj.numel)
        return None


def torch_data_pkl(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                   metadata: dict[str, str] | None = None) -> bytes:
    """The ``data.pkl`` of ``torch.save({"ema": OrderedDict(...), "__metadata__": metadata})``
    (without the second entry when ``metadata`` is None) for tensors of ``shapes`` in ``dtype``;
    the storage of the n-th tensor is record ``data/<n>``."""
    sd = collections.OrderedDict(
        (key, _Tensor(_Storage(dtype, str(n), _numel(shape)), shape))
        for n, (key, shape) in enumerate(shapes.items()))
    obj = {"ema": sd} if metadata is None else {"ema": sd, METADATA_KEY: dict(metadata)}
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _open_record(zf: zipfile.ZipFile, name: str, size: int):
    """A write handle for a stored record whose data starts on a 64-byte boundary."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule; adds 20 header bytes
    start = zf.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0) + 4
    pad = -start % _ALIGN
    info.extra = struct.pack("<HH", _PAD_FIELD, pad) + b"Z" * pad
    return zf.open(info, "w", force_zip64=zip64)


def _write_record(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    with _open_record(zf, name, len(data)) as out:
        out.write(data)


def _write_torch_zip(fh, archive, cfg, shapes, dtype, seed, bar) -> None:
    pkl = torch_data_pkl(shapes, dtype, file_metadata(cfg, seed))
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        _write_record(zf, f"{archive}/data.pkl", pkl)
        _write_record(zf, f"{archive}/.format_version", b"1")
        _write_record(zf, f"{archive}/.storage_alignment", str(_ALIGN).encode())
        _write_record(zf, f"{archive}/byteorder", b"little")
        item = torch.empty((), dtype=dtype).element_size()
        for n, (_, tensor) in enumerate(_generated(cfg, shapes, dtype, seed)):
            with _open_record(zf, f"{archive}/data/{n}", tensor.numel() * item) as out:
                out.write(_raw(tensor))
            bar.update(1)
        _write_record(zf, f"{archive}/version", b"3\n")
        # torch: 40 decimal digits naming this save; here derived from the content, not random
        ident = int.from_bytes(hashlib.sha256(pkl + str(seed).encode()).digest()[:16], "little")
        _write_record(zf, f"{archive}/.data/serialization_id", f"{ident:040d}"[-40:].encode())


# ----------------------------------------------------------------------------- the writer
def write_random_checkpoint(cfg: ModelConfig, path: str | os.PathLike,
                            dtype: torch.dtype = torch.float32, seed: int = 0,
                            progress: bool = True) -> dict:
    """Write a random released-layout checkpoint of ``cfg`` to ``path`` (``.safetensors``, or
    ``.pt``/``.pth`` holding ``{"ema": sd}``), one tensor (plus the next, being generated) in memory
    at a time.

    Returns {"path", "bytes", "seconds", "num_tensors", "params"}. Raises ValueError for an
    unknown suffix or dtype; the file appears only when complete (``<path>.tmp``, then rename).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"checkpoint path {path}: use one of {', '.join(SUFFIXES)}")
    if dtype not in _SAFETENSORS_DTYPE:
        raise ValueError(f"dtype {dtype}: choose torch.float32, torch.bfloat16 or torch.float16")
    shapes = released_shapes(cfg)
    tmp = path.with_name(path.name + ".tmp")
    start = time.perf_counter()
    bar = tqdm(total=len(shapes), unit="tensor", file=sys.stderr, disable=not progress,
               desc=f"writing {path.name}")
    try:
        with bar, open(tmp, "wb") as fh:
            if path.suffix == ".safetensors":
                _write_safetensors(fh, cfg, shapes, dtype, seed, bar)
            else:
                _write_torch_zip(fh, path.stem, cfg, shapes, dtype, seed, bar)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "bytes": path.stat().st_size,
            "seconds": time.perf_counter() - start, "num_tensors": len(shapes),
            "params": sum(_numel(s) for s in shapes.values())}


# ----------------------------------------------------------------------------- dice-ds make-checkpoint
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_OWN_SIZE = ("debug", "digits")  # pixel-space / toy flavors: --image-size does not apply
_PROG = "dice-ds make-checkpoint"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like dice-ds sample / eval
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_PROG, description="Write a random DiT-MoE checkpoint in the released key "
                "layout at real size (one tensor in memory at a time): for scale, start-up and "
                "memory work without the released weights.")
    p.add_argument("--model", required=True, help="flavor: DiT-S/2, DiT-B/2, DiT-XL/2, DiT-G/2, "
                   "digits, debug (aliases S/2 ... G/2)")
    p.add_argument("--depth", type=int, help="blocks (default: the flavor's)")
    p.add_argument("--num-experts", type=int, help="routed experts E (default: the flavor's)")
    p.add_argument("--image-size", type=int, default=256, help="pixels; the latent side is "
                   "image-size/8 (sets pos_embed); ignored by digits/debug (default: 256)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32",
                   help="stored dtype (default: fp32)")
    p.add_argument("--seed", type=int, default=0, help="values depend on the seed and the key "
                   "name alone (default: 0)")
    p.add_argument("--out", required=True, help="output file: .safetensors, or .pt/.pth "
                   "({'ema': state dict}, torch's zip format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The ``ModelConfig`` the flags ask for; ``ConfigError`` naming the flag otherwise."""
    cfg = get_flavor(args.model)
    if args.depth is not None:
        if args.depth < 1:
            raise ConfigError(f"--depth {args.depth}: must be at least 1 (a block count)")
        cfg = cfg.replace(depth=args.depth)
    if args.num_experts is not None:
        if args.num_experts < cfg.top_k:
            raise ConfigError(f"--num-experts {args.num_experts}: must be at least top_k="
                              f"{cfg.top_k} of {cfg.name}")
        cfg = cfg.replace(num_experts=args.num_experts)
    if cfg.name not in _OWN_SIZE:
        step = 8 * cfg.patch_size
        if args.image_size < step or args.image_size % step:
            raise ConfigError(f"--image-size {args.image_size}: use a positive multiple of "
                              f"{step} (latent side = image size / 8, divisible by the patch)")
        cfg = cfg.replace(input_size=args.image_size // 8)
    return cfg.validate()


def check_output(out: Path, overwrite: bool, need: int) -> None:
    """``ConfigError`` if ``--out`` has a bad suffix, exists (without ``--overwrite``), lies in a
    missing directory, or its file system has less than ``need`` bytes free."""
    if out.suffix not in SUFFIXES:
        raise ConfigError(f"--out {out}: unknown suffix {out.suffix or '(none)'!r}; name the "
                          "file .safetensors, .pt or .pth")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; pass a file name inside it")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: exists; pass --overwrite to replace it or choose "
                          "another --out")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: directory {parent} does not exist; create it first")
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ConfigError(f"--out {out}: needs {need / 1e9:.2f} GB but {parent} has only "
                          f"{free / 1e9:.2f} GB free; free space, choose another --out "
                          "directory, or a smaller --dtype/--depth")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype, out = _DTYPES[args.dtype], Path(args.out)
    try:
        cfg = config_from_args(args)
        need = data_nbytes(cfg, dtype) + (1 << 20) + 1024 * len(expected_keys(cfg))
        check_output(out, args.overwrite, need)
    except ConfigError as e:
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        r = write_random_checkpoint(cfg, out, dtype, args.seed, progress=not args.no_progress)
    except OSError as e:
        print(f"{_PROG}: error: --out {out}: writing failed ({e})", file=sys.stderr)
        return 1
    print(f"wrote {r['path']}: {r['bytes'] / 1e9:.2f} GB, {r['params']:,} params, "
          f"{r['num_tensors']} tensors, {cfg.name} depth {cfg.depth} E={cfg.num_experts} "
          f"{args.dtype}, {r['seconds']:.1f} s ({r['bytes'] / 1e6 / r['seconds']:.0f} MB/s)")
    return 0
