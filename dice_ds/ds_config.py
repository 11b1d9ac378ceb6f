"""DeepSpeed-style run configs (``--config FILE.json``): schema, strict JSON reading, flag mapping.

Owns the layout of ``configs/ds/*.json``: DeepSpeed's own keys where DeepSpeed has one
(``train_micro_batch_size_per_gpu``, ``bf16``/``fp16`` ``{"enabled": ...}``, a ``moe`` block with
``ep_size``) and a ``dice`` section for everything else (model, sampling, VAE, outputs, runtime,
async EP, conditional communication, all-to-all payload, sequence parallelism). The schema is a
tree of pydantic models (strict types, unknown keys forbidden at every depth, ranges and choices);
:func:`load_config` returns the *option* values (``RunOptions`` field names) of exactly the keys
present in the file, so flags given on the command line still override them and ``explicit`` keeps
meaning "given by the user".

Also owns the JSON reading rules (duplicate keys, NaN/Infinity, trailing garbage, a top level that is
not an object: each one line) and the converter of the old flat layout (option names as keys):
``python -m dice_ds.ds_config convert OLD.json > NEW.json``.

Invariants: nothing here imports torch, nor ``dice_ds.options`` (which reads this module; the
option names the layout covers are ``OPTION_NAMES``); every error is a one-line ``ConfigError``
naming the JSON path (``dice.async.mode``), the equivalent flag where there is one, and the allowed
values.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dice_ds.config import ConfigError, get_flavor

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

Count = Annotated[int, Field(ge=1)]
NonNeg = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
DType = Literal["fp32", "bf16", "fp16"]
ASYNC_LAYER_NAMES = ("all", "shallow", "deep", "interleaved")


class _Section(BaseModel):
    model_config = _STRICT


class Enabled(_Section):
    """DeepSpeed's ``{"enabled": bool}`` blocks (``bf16``, ``fp16``)."""

    enabled: bool = False


class Moe(_Section):
    """DeepSpeed-style MoE block: expert parallelism."""

    enabled: bool = False
    """--ep: expert parallelism (EP size = ep_size or the world size)."""
    ep_size: Count | None = None
    """--ep-size: EP group size (implies enabled); divides the world size and E."""
    num_experts: Count | None = None
    """--num-experts: routed experts E (must match the checkpoint's)."""


class Model(_Section):
    name: str = "DiT-XL/2"
    depth: Count | None = None
    """--depth: a reduced-depth variant of the flavor (full width); a checkpoint must match."""
    ckpt: str | None = None
    init: Literal["random", "dit"] | None = None
    init_seed: Seed = 0

    @field_validator("name")
    @classmethod
    def _known_flavor(cls, v: str) -> str:
        try:
            get_flavor(v)
        except ConfigError:
            from dice_ds.config import FLAVORS

            raise ValueError(f"unknown model; choose one of {', '.join(FLAVORS)}") from None
        return v


class Sampling(_Section):
    sampler: Literal["rf", "ddpm", "ddim"] | None = None
    num_steps: Count | None = None
    cfg_scale: Annotated[float, Field(ge=1.0)] = 1.5
    image_size: Count | None = None
    num_samples: Count = 50000
    global_seed: Seed = 0


class Vae(_Section):
    type: Literal["sd", "identity", "none"] = "sd"
    path: str | None = None


class Output(_Section):
    sample_dir: str | None = None
    extra_name: str | None = None
    extra_folder_name: str | None = None
    trim_samples: bool = False
    force_new: bool = False


class Runtime(_Section):
    device: Literal["cpu", "cuda"] | None = None
    tf32: bool = False
    pg_timeout: Annotated[float, Field(gt=0)] | None = None
    verbose: bool = False


def _async_layers(v: Any) -> str | list[int]:
    if isinstance(v, str) and v in ASYNC_LAYER_NAMES:
        return v
    if isinstance(v, list) and v and all(type(x) is int and x >= 0 for x in v):
        return v
    raise ValueError(f"use one of {', '.join(ASYNC_LAYER_NAMES)} or a non-empty list of layer "
                     "indices, e.g. [0, 1, 5]")


class Async(_Section):
    """Asynchronous (DICE) expert parallelism; needs ``moe.enabled``."""

    enabled: bool = False
    mode: Literal["displaced", "interweaved"] = "displaced"
    layers: Any = "shallow"
    """'all' | 'shallow' | 'deep' | 'interleaved' (--ep-async-mode) or indices (--ep-async-layers)."""
    warm_up: NonNeg = 0
    cool_down: NonNeg = 0
    strided_sync: NonNeg = 0
    stale_output_weights: Literal["cached", "current"] | None = None
    auto_gc: bool = False

    @field_validator("layers", mode="plain")
    @classmethod
    def _layers(cls, v: Any):
        return _async_layers(v)


class ConditionalComm(_Section):
    period: Count = 1
    strategy: Literal["low", "high", "rand"] | None = None


class Communication(_Section):
    payload_dtype: DType | None = None


class SequenceParallel(_Section):
    enabled: bool = False
    size: Count | None = None
    # "async" is a Python keyword: the JSON key is "async", the attribute async_
    async_: bool = Field(False, alias="async")
    async_warm_up: NonNeg = 0
    single_img: bool = False
    legacy_cache: bool = False


class Dice(_Section):
    model: Model = Model()
    sampling: Sampling = Sampling()
    vae: Vae = Vae()
    output: Output = Output()
    runtime: Runtime = Runtime()
    # "async" is a keyword too
    async_: Async = Field(Async(), alias="async")
    conditional_comm: ConditionalComm = ConditionalComm()
    communication: Communication = Communication()
    sp: SequenceParallel = SequenceParallel()


class DsConfig(_Section):
    """The whole file."""

    description: str | None = None
    """Free text (JSON has no comments)."""
    train_micro_batch_size_per_gpu: Count = 32
    bf16: Enabled = Enabled()
    fp16: Enabled = Enabled()
    moe: Moe = Moe()
    dice: Dice = Dice()


# JSON path -> RunOptions field, for every key that maps one to one
SIMPLE: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "per_proc_batch_size",
    "moe.enabled": "ep",
    "moe.ep_size": "ep_size",
    "moe.num_experts": "num_experts",
    "dice.model.name": "model",
    "dice.model.depth": "depth",
    "dice.model.ckpt": "ckpt",
    "dice.model.init": "init",
    "dice.model.init_seed": "init_seed",
    "dice.sampling.sampler": "sampler",
    "dice.sampling.num_steps": "num_sampling_steps",
    "dice.sampling.cfg_scale": "cfg_scale",
    "dice.sampling.image_size": "image_size",
    "dice.sampling.num_samples": "num_fid_samples",
    "dice.sampling.global_seed": "global_seed",
    "dice.vae.type": "vae",
    "dice.vae.path": "vae_path",
    "dice.output.sample_dir": "sample_dir",
    "dice.output.extra_name": "extra_name",
    "dice.output.extra_folder_name": "extra_folder_name",
    "dice.output.trim_samples": "trim_samples",
    "dice.runtime.device": "device",
    "dice.runtime.tf32": "tf32",
    "dice.runtime.pg_timeout": "pg_timeout",
    "dice.runtime.verbose": "verbose",
    "dice.output.force_new": "force_new",
    "dice.async.enabled": "ep_async",
    "dice.async.warm_up": "ep_async_warm_up",
    "dice.async.cool_down": "ep_async_cool_down",
    "dice.async.strided_sync": "strided_sync",
    "dice.async.stale_output_weights": "stale_output_weights",
    "dice.async.auto_gc": "auto_gc",
    "dice.conditional_comm.period": "ep_async_noskip_step",
    "dice.conditional_comm.strategy": "ep_async_skip_strategy",
    "dice.communication.payload_dtype": "a2a_dtype",
    "dice.sp.enabled": "sp",
    "dice.sp.size": "sp_size",
    "dice.sp.async": "sp_async",
    "dice.sp.async_warm_up": "sp_async_warm_up",
    "dice.sp.single_img": "single_img",
    "dice.sp.legacy_cache": "sp_legacy_cache",
}
# keys with a mapping of their own (see _to_options)
SPECIAL: dict[str, tuple[str, ...]] = {
    "bf16.enabled": ("dtype",),
    "fp16.enabled": ("dtype",),
    "dice.async.mode": ("ep_async_pipeline",),
    "dice.async.layers": ("ep_async_mode", "ep_async_layers"),
}
# every option name the layout knows: all of ``RunOptions`` (tests/unit/test_options.py holds this
# against ``dice_ds.options.option_fields``), so this schema needs no import of the option table;
# ``ep_score_use_latest`` has no key of its own (convert_flat maps it onto stale_output_weights)
OPTION_NAMES: frozenset[str] = frozenset(
    {*SIMPLE.values(), *(o for opts in SPECIAL.values() for o in opts), "ep_score_use_latest"})


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def flag_of(path: str) -> str | None:
    """The command-line flag(s) a JSON path stands for (None for ``description``)."""
    if path in SIMPLE:
        return _flag(SIMPLE[path])
    if path in SPECIAL:
        return "/".join(_flag(o) for o in SPECIAL[path])
    return None


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} in one JSON object: keep one of them")
        seen[key] = value
    return seen


def _no_constants(name: str):
    raise ConfigError(f"{name} is not a number JSON allows: give a finite value")


def read_json(path: str) -> Any:
    """Parse ``path`` strictly: no duplicate keys, no NaN/Infinity, nothing after the value."""
    if os.path.isdir(path):
        raise ConfigError(f"--config {path}: is a directory; give a JSON file")
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot be read ({e})") from None
    if not text.strip():
        raise ConfigError(f"--config {path}: is empty; give a JSON object (see configs/ds/)")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    except json.JSONDecodeError as e:
        what = "nothing may follow the JSON object" if e.msg == "Extra data" else e.msg
        raise ConfigError(f"--config {path}: not valid JSON: {what} (line {e.lineno}, column "
                          f"{e.colno})") from None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = DsConfig
    for key in loc:
        if model is None:
            return None
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        f = fields.get(key)
        ann = f.annotation if f is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe(err: dict) -> str:
    loc = tuple(str(x) for x in err["loc"])
    path = ".".join(loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = f" (allowed here: {', '.join(_allowed_keys(parent))})" if parent else ""
        where = ".".join(loc[:-1]) or "the top level"
        return f"unknown key {path}{allowed}; check the spelling under {where}"
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path} must be a JSON object, got {err['input']!r}"
    flag = flag_of(path)
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}{f' ({flag})' if flag else ''} = {json.dumps(err['input'])}: {msg}"


def validate_data(data: Any, source: str) -> DsConfig:
    """The validated config, or one ConfigError line naming the first bad path."""
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string"}.get(type(data), type(data).__name__)
        raise ConfigError(f"--config {source}: must be a JSON object (DeepSpeed-style layout, see "
                          f"configs/ds/), got {kind}")
    if data and is_flat(data):
        raise ConfigError(f"--config {source}: uses the old flat layout (option names as keys); "
                          f"convert it with: python -m dice_ds.ds_config convert {source} > NEW.json")
    try:
        return DsConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"--config {source}: {_describe(errors[0])}{more}") from None


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _to_options(cfg: DsConfig, source: str) -> dict[str, Any]:
    given = _flatten(cfg.model_dump(exclude_unset=True, by_alias=True))
    given.pop("description", None)
    opts = {SIMPLE[p]: v for p, v in given.items() if p in SIMPLE}
    bf16, fp16 = given.get("bf16.enabled"), given.get("fp16.enabled")
    if bf16 and fp16:
        raise ConfigError(f"--config {source}: bf16.enabled and fp16.enabled are both true: "
                          "enable one of them (neither: fp32)")
    if bf16 is not None or fp16 is not None:
        opts["dtype"] = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    if "dice.async.mode" in given:
        opts["ep_async_pipeline"] = given["dice.async.mode"] == "interweaved"
    layers = given.get("dice.async.layers")
    if isinstance(layers, str):
        opts["ep_async_mode"] = layers
    elif layers is not None:
        opts["ep_async_layers"] = ",".join(str(x) for x in layers)
    return opts


def load_config(path: str) -> dict[str, Any]:
    """Option values (``RunOptions`` field names) for exactly the keys present in ``path``."""
    return config_values(read_json(path), path)


def config_values(data: Any, source: str) -> dict[str, Any]:
    """Option values of an already parsed config (e.g. a dict given to ``DiTMoEPipeline``)."""
    return _to_options(validate_data(data, source), source)


# ---------------------------------------------------------------------------------------------------
# the old flat layout
# ---------------------------------------------------------------------------------------------------

_TOP_KEYS = set(DsConfig.model_fields)


def is_flat(data: dict) -> bool:
    """True if every top-level key is an option name and none is a key of the current layout."""
    return not (set(data) & _TOP_KEYS) and set(data) <= OPTION_NAMES


def convert_flat(flat: dict) -> dict:
    """The current layout of an old flat config (keys = option names); validates the result."""
    unknown = sorted(set(flat) - OPTION_NAMES)
    if unknown:
        raise ConfigError(f"unknown option name(s) {', '.join(unknown)}")
    back = {v: k for k, v in SIMPLE.items()}
    out: dict = {}

    def put(path: str, value) -> None:
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    for name, value in flat.items():
        if name in back:
            put(back[name], value)
        elif name == "dtype":
            put("bf16.enabled", value == "bf16")
            put("fp16.enabled", value == "fp16")
        elif name == "ep_async_pipeline":
            put("dice.async.mode", "interweaved" if value else "displaced")
        elif name == "ep_async_mode":
            put("dice.async.layers", value)
        elif name == "ep_async_layers" and value is not None:
            put("dice.async.layers", [int(s) for s in str(value).split(",") if s.strip()])
        elif name == "ep_score_use_latest":
            if value:  # the reference flag means the cached weights (spec §2.2.4)
                put("dice.async.stale_output_weights", "cached")
        else:
            raise ConfigError(f"option {name!r} has no place in the config layout")
    validate_data(out, "<converted>")
    order = ["description", "train_micro_batch_size_per_gpu", "bf16", "fp16", "moe", "dice"]
    return {k: out[k] for k in order if k in out}


def main(argv: list[str] | None = None) -> int:
    """``python -m dice_ds.ds_config convert OLD.json`` (prints the new layout) | ``check FILE``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m dice_ds.ds_config {convert OLD.json | check FILE.json ...}"
    if len(argv) < 2 or argv[0] not in ("convert", "check"):
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[0] == "convert":
            if len(argv) != 2:
                print(usage, file=sys.stderr)
                return 2
            data = read_json(argv[1])
            if not isinstance(data, dict):
                raise ConfigError(f"{argv[1]}: must be a JSON object")
            print(json.dumps(convert_flat(data), indent=2))
        else:
            for path in argv[1:]:
                load_config(path)
                print(f"{path}: ok")
    except ConfigError as e:
        print(f"dice_ds.ds_config: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
