"""The ``.safetensors`` header: parsed and validated here, at least as strictly as the library.

Owns ``parse_safetensors_header(head, file_size)`` (the 8-byte length and JSON table -> every
tensor's dtype, shape and absolute byte range, plus ``__metadata__``), ``library_refusal(path)``
(what the ``safetensors`` library itself says about the file, or None) and
``CheckpointFormatError``. ``dice_ds/weights/read.py``'s ``SafetensorsReader`` runs both: this
parser for the byte offsets its ``pread`` streaming needs, then the library as a second gate.

Why a parser of our own next to the library's: the library's Python API (``safe_open``) does not
expose a tensor's byte offsets, and its ``get_slice`` reads through a memory mapping into a new
tensor. The streaming loader (``dice_ds/weights/load.py``) instead ``pread``s this rank's regions
only (one EP rank's experts of a 40 GB file), straight into the parameter or into a bounded scratch
buffer, so that no mapped page is counted as this process's memory and no second copy is made
(``docs/scale.md``). The library is still asked, once per open (``safe_open`` parses the header and
maps the file without reading it: microseconds), so a file it refuses is never loaded even if this
parser had a gap; ``tests/unit/test_checkpoint_fuzz.py`` checks on 500 malformed files that this
parser alone already refuses everything the library refuses.

The rules (safetensors 0.8 ``Metadata::validate`` and its serde types, checked on malformed files
by the fuzz test), each failure one ``CheckpointFormatError`` sentence naming the tensor:

- the file holds the 8-byte little-endian header length N, N <= 100 MB, 8 + N <= file size;
- the header is UTF-8 JSON (no NaN/Infinity tokens, no lone surrogates) and a JSON object;
- no key repeats in any object (stricter than the library, which keeps the last of two equal
  tensor names or metadata keys);
- ``__metadata__`` is null or a map of strings to strings;
- every other key is a tensor entry: an object with ``dtype`` (a name the library knows, and one
  dice_ds reads: F64/F32/F16/BF16/I64/I32/I16/I8/U8/BOOL), ``shape`` (non-negative integers) and
  ``data_offsets`` (two non-negative integers, begin <= end); unknown fields are ignored, as by
  the library;
- sorted by offsets, the tensors tile the data area from 0 without gap or overlap; each tensor's
  byte count is its element count times its dtype's size (no overflow);
- the data area ends exactly at the end of the file (a truncated file, or bytes appended after
  the last tensor, are refused).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from safetensors import safe_open

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
"""The dtypes dice_ds reads, by their safetensors names (a subset of the library's)."""
LIBRARY_DTYPES = frozenset({
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64",
    "I64", "U64",
})
"""Every dtype name safetensors 0.8 accepts (its ``Dtype`` enum)."""
MAX_HEADER_BYTES = 100_000_000
"""The library's ``MAX_HEADER_SIZE``."""
_U64 = 1 << 64


class CheckpointFormatError(ValueError):
    """The file is not a checkpoint dice_ds can read (``open_checkpoint`` words it as a
    ``ConfigError``; raised as it is only by a read past the end of a file that shrank after it was
    opened)."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: per tensor (dtype, shape, absolute file offset of its first byte)."""

    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]]
    metadata: dict[str, str]
    data_start: int


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointFormatError(f"header repeats the key {key!r} in one object")
        for s in (key, value) if isinstance(value, str) else (key,):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointFormatError("header holds a lone UTF-16 surrogate escape (not "
                                            "valid UTF-8)") from None
        out[key] = value
    return out


def _refuse_constant(name):
    raise CheckpointFormatError(f"header holds {name}, which JSON does not allow")


def _uint(value, what: str) -> int:
    if type(value) is not int or not 0 <= value < _U64:
        raise CheckpointFormatError(f"{what} must be a non-negative integer, got {value!r:.40}")
    return value


def _entry(key: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype name, shape, begin, end) of one tensor entry, types checked."""
    if not isinstance(entry, dict):
        raise CheckpointFormatError(f"tensor {key!r:.60}: entry must be a JSON object, got "
                                    f"{type(entry).__name__}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise CheckpointFormatError(f"tensor {key!r:.60}: entry has no {field!r}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in LIBRARY_DTYPES:
        raise CheckpointFormatError(f"tensor {key!r:.60}: unknown dtype {dtype!r:.40}")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointFormatError(f"tensor {key!r:.60} has unsupported dtype {dtype!r} (dice_ds "
                                    f"reads {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list):
        raise CheckpointFormatError(f"tensor {key!r:.60}: shape must be a list of integers")
    dims = tuple(_uint(s, f"tensor {key!r:.60}: shape entry") for s in shape)
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise CheckpointFormatError(f"tensor {key!r:.60}: data_offsets must be [begin, end]")
    begin, end = (_uint(o, f"tensor {key!r:.60}: data_offsets entry") for o in offsets)
    return dtype, dims, begin, end


def parse_safetensors_header(head: bytes, header_text: bytes | None, file_size: int
                             ) -> SafetensorsHeader:
    """Validate a header (module doc). ``head``: the file's first 8 bytes; ``header_text``: the N
    bytes after them (None: not read yet -- the call then only checks N, and the caller reads N
    bytes and calls again); ``file_size``: the file's size in bytes."""
    if len(head) < 8 or file_size < 8:
        raise CheckpointFormatError("shorter than a safetensors header (8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointFormatError(f"safetensors header length {n} is impossible for a file of "
                                    f"{file_size} bytes (limit {MAX_HEADER_BYTES})")
    if header_text is None:
        return SafetensorsHeader({}, {}, 8 + n)
    if len(header_text) != n:
        raise CheckpointFormatError(f"header holds {len(header_text)} of its {n} bytes (truncated)")
    try:
        text = header_text.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointFormatError("safetensors header is not UTF-8") from None
    try:
        table = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except ValueError as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"safetensors header is not JSON ({e})") from None
    if not isinstance(table, dict):
        raise CheckpointFormatError(f"safetensors header must be a JSON object, got "
                                    f"{type(table).__name__}")
    metadata = table.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError("__metadata__ must map strings to strings")
    entries = sorted(((_entry(k, v), k) for k, v in table.items()), key=lambda e: e[0][2:])
    data_start, at, tensors = 8 + n, 0, {}
    for (dtype, dims, begin, end), key in entries:
        if begin != at or end < begin:
            how = ("end before they begin" if end < begin else
                   "overlap" if begin < at else "leave a gap after")
            raise CheckpointFormatError(f"tensor {key!r:.60} has an invalid offset: bytes "
                                        f"[{begin}, {end}) {how} the previous tensor's end {at} "
                                        "(overlapping or unordered byte ranges)")
        numel = 1
        for s in dims:
            numel *= s
        nbytes = numel * SAFETENSORS_DTYPES[dtype].itemsize
        if nbytes >= _U64:
            raise CheckpointFormatError(f"tensor {key!r:.60}: shape {list(dims)} overflows")
        if end - begin != nbytes:
            raise CheckpointFormatError(f"tensor {key!r:.60} has {end - begin} bytes but shape "
                                        f"{list(dims)} of {dtype} needs {nbytes}")
        if data_start + end > file_size:
            raise CheckpointFormatError(f"tensor {key!r:.60} ends at byte {data_start + end}, past "
                                        f"the end of the file ({file_size} bytes): truncated")
        tensors[key] = (SAFETENSORS_DTYPES[dtype], dims, data_start + begin)
        at = end
    if data_start + at != file_size:
        raise CheckpointFormatError(f"{file_size - data_start - at} bytes follow the last tensor "
                                    "(appended data, or a header that does not cover the file)")
    return SafetensorsHeader(tensors, metadata, data_start)


def library_refusal(path: str) -> str | None:
    """The ``safetensors`` library's one-line reason to refuse ``path``, or None if it opens it
    (it parses and validates the header and maps the file; no tensor byte is read)."""
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - the library raises SafetensorError and OSError
        text = str(e).strip().splitlines()
        return (text[0] if text else type(e).__name__)[:200]
    return None
