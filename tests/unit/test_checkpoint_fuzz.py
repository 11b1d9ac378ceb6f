"""Fuzz of the ``.safetensors`` reader (dice_ds/weights/header.py, read.py) against the library.

500 malformed files are made from one small valid file (seeded: case ``i`` is a function of ``i``
alone, so a failure names a case that can be rerun): random header edits (dtype, shape, offsets,
key names, whole entries, ``__metadata__``, the header length, JSON syntax), truncations, appended
garbage, byte flips, and NaN/inf written into a tensor's bytes. For every case:

- our header parser alone (``parse_safetensors_header``, without the library gate that
  ``open_checkpoint`` adds) refuses every file that the ``safetensors`` library refuses;
- ``open_checkpoint`` plus reading every tensor never succeeds on such a file, and never fails
  with anything but a one-line ``ConfigError`` (no KeyError, struct.error, ValueError, ...);
- where both accept a file, they agree on every key, dtype, shape and value (bit for bit).

Cases the library accepts and we refuse (duplicate keys, dtypes dice_ds does not read, NaN/inf
bytes, a file without tensors) are counted, not failures: stricter is allowed.
"""
import collections
import copy
import json
import random
import struct
import time

import pytest
import torch
from safetensors import safe_open

from dice_ds.config import ConfigError
from dice_ds.weights.header import LIBRARY_DTYPES, CheckpointFormatError, parse_safetensors_header
from dice_ds.weights.read import open_checkpoint

CASES = 500
SEED = 21
BASE = collections.OrderedDict([
    ("a.weight", ("F32", [2, 3])), ("b.bias", ("F16", [4])), ("c.table", ("BF16", [2, 2])),
    ("d.count", ("I64", [1])), ("e.empty", ("F32", [0])), ("f.scalar", ("F64", [])),
])
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "F64": 8}


def _base() -> tuple[dict, bytes]:
    """The valid file's header (a dict) and data bytes (finite values)."""
    header, data, at = {"__metadata__": {"format": "pt", "note": "fuzz base"}}, b"", 0
    rng = random.Random(0)
    for key, (dtype, shape) in BASE.items():
        n = 1
        for s in shape:
            n *= s
        if dtype == "I64":
            chunk = b"".join(struct.pack("<q", rng.randrange(-9, 9)) for _ in range(n))
        else:
            t = torch.tensor([rng.uniform(-2, 2) for _ in range(n)], dtype=torch.float64)
            t = t.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64}[dtype])
            chunk = t.view(torch.uint8).numpy().tobytes() if n else b""
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(chunk)]}
        data, at = data + chunk, at + len(chunk)
    return header, data


def _file(text: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _text(header) -> bytes:
    text = json.dumps(header).encode()
    return text + b" " * (-len(text) % 8)


# ----------------------------------------------------------------------------- mutations
def _tensor(rng, header) -> str:
    return rng.choice([k for k in header if k != "__metadata__"])


_ODD_VALUES = [-1, 1.5, 2.0, "3", True, None, [], {}, 2 ** 64, 2 ** 64 - 1, 2 ** 40]


def m_dtype(rng, header, data):
    key = _tensor(rng, header)
    header[key]["dtype"] = rng.choice(sorted(LIBRARY_DTYPES) + ["f32", "", "F33", "FLOAT", 5,
                                                                  None, ["F32"]])
    return _file(_text(header), data), f"dtype of {key} -> {header[key]['dtype']!r}"


def m_shape(rng, header, data):
    key = _tensor(rng, header)
    shape = header[key]["shape"]
    op = rng.randrange(6)
    if op == 0 and shape:
        i = rng.randrange(len(shape))
        shape[i] = max(0, shape[i] + rng.choice([-1, 1, 2]))
    elif op == 1:
        shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2, 0]))
    elif op == 2 and shape:
        shape.pop(rng.randrange(len(shape)))
    elif op == 3 and shape:
        shape[rng.randrange(len(shape))] = rng.choice(_ODD_VALUES)
    elif op == 4:
        header[key]["shape"] = rng.choice(["2", 2, None, {"0": 2}])
    else:
        header[key]["shape"] = list(reversed(shape)) + [1]
    return _file(_text(header), data), f"shape of {key} -> {header[key]['shape']!r}"


def m_offsets(rng, header, data):
    key = _tensor(rng, header)
    off = header[key]["data_offsets"]
    other = header[_tensor(rng, header)]["data_offsets"]
    op = rng.randrange(7)
    if op == 0:
        off[rng.randrange(2)] += rng.choice([-8, -2, -1, 1, 2, 4])
    elif op == 1:
        off.reverse()
    elif op == 2:
        header[key]["data_offsets"] = list(other)  # overlap (or equal)
    elif op == 3:
        for v in header.values():  # a gap: every tensor from this one on moves
            if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= off[0]:
                v["data_offsets"] = [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]
        data = data + bytes(4)
    elif op == 4:
        off[rng.randrange(2)] = rng.choice(_ODD_VALUES)
    elif op == 5:
        header[key]["data_offsets"] = off + [off[1]]
    else:
        header[key]["data_offsets"] = [off[0], other[1]]
    return _file(_text(header), data), f"data_offsets of {key} -> {header[key]['data_offsets']!r}"


def m_key(rng, header, data):
    key = _tensor(rng, header)
    op = rng.randrange(5)
    entry = header.pop(key)
    if op == 0:  # a duplicate name: written as JSON text (a dict cannot hold it)
        dup = _tensor(rng, header)
        text = json.dumps(header)
        text = text[:-1] + ", " + json.dumps(dup) + ": " + json.dumps(entry) + "}"
        return _file(text.encode(), data), f"{key} renamed to the duplicate {dup}"
    if op == 1:
        new = rng.choice(["", "__metadata__", "é", "x" * 300, "a.weight "])
        header[new] = entry
        return _file(_text(header), data), f"{key} renamed to {new!r:.20}"
    if op == 2:
        return _file(_text(header), data), f"{key} removed (its bytes uncovered)"
    if op == 3:  # a control character in a name, as raw JSON text
        text = json.dumps({**header, "k\x01": entry}, ensure_ascii=False)
        return _file(text.encode(), data), "name with a raw control character"
    text = json.dumps(header)[:-1] + ', "\\ud800": ' + json.dumps(entry) + "}"
    return _file(text.encode(), data), "name with a lone surrogate escape"


def m_entry(rng, header, data):
    key = _tensor(rng, header)
    op = rng.randrange(5)
    if op == 0:
        header[key] = rng.choice([5, [], "x", None, True])
    elif op == 1:
        del header[key][rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 2:
        header[key]["extra"] = rng.choice([1, "x", None])
    elif op == 3:
        return _file(json.dumps(rng.choice([[1, 2], "x", 3, None, True])).encode(), data), \
            "header not an object"
    else:
        return _file(b"{}", b""), "no tensors"
    return _file(_text(header), data), f"entry of {key} -> {header[key]!r:.60}"


def m_metadata(rng, header, data):
    header["__metadata__"] = rng.choice([5, [], "x", None, {"k": 1}, {"k": None},
                                         {"k": {"n": "v"}}, {"k": ["v"]}, {}, {"": ""}])
    return _file(_text(header), data), f"__metadata__ -> {header['__metadata__']!r}"


def m_length(rng, header, data):
    text = _text(header)
    length = rng.choice([0, 1, 7, len(text) - 1, len(text) + 1, len(text) + 8,
                         len(text) + len(data), len(text) + len(data) + 1, 100_000_001,
                         2 ** 63, 2 ** 64 - 1, rng.randrange(2 ** 64)])
    return _file(text, data, length), f"header length -> {length}"


_JSON_CHARS = '{}[],:"0123456789aeEN -.\\'


def m_syntax(rng, header, data):
    text = bytearray(json.dumps(header).encode())
    op = rng.randrange(8)
    i = rng.randrange(len(text))
    if op == 0:
        del text[i]
    elif op == 1:
        text.insert(i, ord(rng.choice(_JSON_CHARS)))
    elif op == 2:
        text[i] = ord(rng.choice(_JSON_CHARS))
    elif op == 3:
        text = text[:i]
    elif op == 4:
        text += rng.choice([b"x", b"\x00\x00", b" {}", b"\t\n ", b",", b"}"])
    elif op == 5:
        digits = [j for j, c in enumerate(text) if chr(c).isdigit()]
        j = rng.choice(digits)
        text[j:j + 1] = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e0", b"-0", b"0.0"])
    elif op == 6:
        text = bytearray(rng.choice([b"\xef\xbb\xbf", b" ", b"\n", b"\xff"])) + text
    else:
        text[i] = rng.choice([0x80, 0xC3, 0xFF, 0x00, 0x7F])
    return _file(bytes(text), data), f"JSON edit {op} at {i}"


def m_truncate(rng, header, data):
    raw = _file(_text(header), data)
    cut = rng.randrange(len(raw))
    return raw[:cut], f"truncated to {cut} of {len(raw)} bytes"


def m_append(rng, header, data):
    extra = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 65)))
    return _file(_text(header), data) + extra, f"{len(extra)} bytes appended"


def m_flip(rng, header, data):
    raw = bytearray(_file(_text(header), data))
    where = []
    for _ in range(rng.randrange(1, 5)):
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
        where.append(i)
    return bytes(raw), f"bits flipped at {where}"


def m_values(rng, header, data):
    """NaN/inf bytes in a floating tensor (or random bytes in any): a valid file the library
    loads; open_checkpoint refuses the non-finite values as it reads them."""
    key = rng.choice([k for k, (dtype, shape) in BASE.items() if dtype != "I64" and shape != [0]])
    dtype = header[key]["dtype"]
    lo = header[key]["data_offsets"][0]
    value = rng.choice([float("nan"), float("inf"), -float("inf")])
    t = torch.tensor([value]).to({"F32": torch.float32, "F16": torch.float16,
                                  "BF16": torch.bfloat16, "F64": torch.float64}[dtype])
    raw = bytearray(data)
    raw[lo:lo + _SIZES[dtype]] = t.view(torch.uint8).numpy().tobytes()
    return _file(_text(header), bytes(raw)), f"{value} in {key}"


MUTATIONS = [m_dtype, m_shape, m_offsets, m_key, m_entry, m_metadata, m_length, m_syntax,
             m_truncate, m_append, m_flip, m_values]


def make_case(i: int) -> tuple[str, bytes, str]:
    """(category, file bytes, what was done) of case ``i`` (a function of ``SEED`` and ``i``)."""
    rng = random.Random(SEED * 100_003 + i)
    mutate = MUTATIONS[i % len(MUTATIONS)]
    header, data = _base()
    raw, what = mutate(rng, copy.deepcopy(header), data)
    return mutate.__name__[2:], raw, what


# ----------------------------------------------------------------------------- verdicts
def library_tensors(path) -> dict | str:
    """Every tensor as the library reads it, or its refusal (a string)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any refusal counts
        return f"{type(e).__name__}: {e}"


def parser_verdict(raw: bytes) -> str | None:
    """None if header.py's parser alone accepts ``raw``, else its reason."""
    try:
        head = raw[:8]
        start = parse_safetensors_header(head, None, len(raw)).data_start
        parse_safetensors_header(head, raw[8:start], len(raw))
    except CheckpointFormatError as e:
        return str(e)
    return None


def our_tensors(path) -> dict | str:
    """Every tensor as ``open_checkpoint`` reads it, or the ConfigError line. Anything else
    propagates (and fails the test)."""
    try:
        with open_checkpoint(path) as reader:
            return {k: reader.read(k) for k in reader.keys()}
    except ConfigError as e:
        return str(e)


def test_the_base_file_is_valid(tmp_path):
    header, data = _base()
    path = tmp_path / "base.safetensors"
    path.write_bytes(_file(_text(header), data))
    theirs, ours = library_tensors(path), our_tensors(path)
    assert isinstance(theirs, dict) and isinstance(ours, dict), (theirs, ours)
    assert parser_verdict(path.read_bytes()) is None
    assert set(ours) == set(theirs) == set(BASE)
    for k in BASE:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_cases_are_reproducible():
    assert [make_case(i) for i in (0, 7, 499)] == [make_case(i) for i in (0, 7, 499)]


def test_fuzz_never_loads_what_the_library_refuses(tmp_path):
    t0 = time.perf_counter()
    stats = collections.defaultdict(collections.Counter)
    failures = []
    for i in range(CASES):
        category, raw, what = make_case(i)
        path = tmp_path / f"case{i}.safetensors"
        path.write_bytes(raw)
        theirs = library_tensors(path)
        try:
            ours = our_tensors(path)
        except Exception as e:  # noqa: BLE001 - a traceback-type failure is what this test finds
            failures.append(f"case {i} ({category}: {what}): {type(e).__name__}: {e}")
            continue
        parsed = parser_verdict(raw)
        refused = isinstance(theirs, str)
        stats[category]["library refuses" if refused else "library accepts"] += 1
        if isinstance(ours, str):
            stats[category]["we refuse"] += 1
            if "\n" in ours:
                failures.append(f"case {i} ({category}: {what}): a multi-line error: {ours!r}")
            if not refused:
                stats[category]["stricter than the library"] += 1
        if refused and not isinstance(ours, str):
            failures.append(f"case {i} ({category}: {what}): the library refuses ({theirs}) but "
                            "open_checkpoint loads it")
        if refused and parsed is None:
            failures.append(f"case {i} ({category}: {what}): the library refuses ({theirs}) but "
                            "header.py's parser accepts it")
        if not refused and not isinstance(ours, str):
            for k in theirs:
                if not (k in ours and ours[k].dtype == theirs[k].dtype
                        and ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k])):
                    failures.append(f"case {i} ({category}: {what}): tensor {k!r} differs")
            if set(ours) != set(theirs):
                failures.append(f"case {i} ({category}: {what}): keys differ")
    seconds = time.perf_counter() - t0
    print(f"\n{CASES} cases in {seconds:.1f} s")
    for category, counts in sorted(stats.items()):
        print(f"  {category:9s} {dict(counts)}")
    assert not failures, "\n".join(failures[:20])
    assert sum(c["library refuses"] for c in stats.values()) >= CASES // 2
    for category, counts in stats.items():  # every kind of edit reaches a refusal somewhere
        assert counts["we refuse"] > 0, category
        assert category == "values" or counts["library refuses"] > 0, category
    assert stats["values"]["stricter than the library"] == stats["values"]["library accepts"] > 0


@pytest.mark.parametrize("header, reason", [
    ({"a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "leave a gap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "end before they begin"),
    ({"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
     "__metadata__ must map strings to strings"),
    ({"a": {"dtype": "U16", "shape": [4], "data_offsets": [0, 8]}}, "unsupported dtype 'U16'"),
])
def test_named_refusals(tmp_path, header, reason):
    path = tmp_path / "x.safetensors"
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    path.write_bytes(_file(json.dumps(header).encode(), bytes(max(end, 8))))
    with pytest.raises(ConfigError, match=reason):
        open_checkpoint(path)


def test_duplicate_keys_are_refused_though_the_library_keeps_the_last(tmp_path):
    entry = json.dumps({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})
    path = tmp_path / "dup.safetensors"
    path.write_bytes(_file(f'{{"a": {entry}, "a": {entry}}}'.encode(), bytes(8)))
    assert isinstance(library_tensors(path), dict)
    with pytest.raises(ConfigError, match="repeats the key 'a'"):
        open_checkpoint(path)
