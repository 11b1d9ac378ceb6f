"""Run options of ``dice-ds sample``: one dataclass, its argparse parser, JSON config merge, validation.

Owns ``RunOptions`` (every flag; field name = argparse dest), ``parse_options`` (defaults <
``--config FILE.json`` < flags given on the command line; the DeepSpeed-style file layout and its
schema live in ``dice_ds.ds_config``, which maps JSON paths onto these field names; boolean flags
have ``--no-<flag>`` forms), ``validate_options`` (every check that needs no checkpoint and no
process group: types, finiteness, ranges, combinations, files, ``--sample-dir``) and the mapping to
``ParallelPlan``. The bad inputs and their messages are listed in ``docs/bad-inputs.md``.

Invariants: nothing here imports torch or starts a process group; every bad input raises
``ConfigError`` with one line naming the flag and the fix. Which flags were given explicitly (on the
command line or in the JSON file) is recorded in ``RunOptions.explicit``: the parser has no defaults,
so only given flags appear in its namespace.

Reference-compatible flags (DICE ``sample_ddp.py``, spec §2.0) keep their names; where a reference
flag is misleading the mapping is documented in its help text (``--ep-score-use-latest``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field

from dice_ds.config import FLAVORS, ConfigError, get_flavor


def _opt(default, kind, help_, flags=None, choices=None):
    return field(default=default, metadata={"kind": kind, "help": help_, "flags": flags,
                                            "choices": choices})


@dataclass
class RunOptions:
    """Every option of one sampling run (see ``dice-ds sample --help``)."""

    # model and weights
    model: str = _opt("DiT-XL/2", str, f"model flavor: {', '.join(FLAVORS)}")
    num_experts: int | None = _opt(None, int, "routed experts E; read from --ckpt (an explicit "
                                   "value must match it); without --ckpt the flavor's")
    depth: int | None = _opt(None, int, "blocks of the model (default: the flavor's): a "
                             "reduced-depth variant at full width, for scale and profiling work; "
                             "a --ckpt must have this depth")
    ckpt: str | None = _opt(None, str, "checkpoint file (released DiT-MoE .pt or dice_ds)")
    init: str | None = _opt(None, str, "no checkpoint: initialise weights ('random': N(0, 0.02) "
                            "everywhere, non-trivial outputs for smoke runs; 'dit': DiT's init, "
                            "whose zeroed output layer gives zero predictions)",
                            choices=("random", "dit"))
    init_seed: int = _opt(0, int, "seed of --init")
    # sampling
    sampler: str | None = _opt(None, str, "rf | ddpm | ddim (default: the flavor's: RF for XL/G, "
                               "DDPM for S/B)", choices=("rf", "ddpm", "ddim"))
    num_sampling_steps: int | None = _opt(None, int, "sampling steps S (default 50 for rf, 250 for "
                                          "ddpm/ddim); honoured on every path")
    cfg_scale: float = _opt(1.5, float, "classifier-free guidance scale (>= 1; 1 skips the "
                            "doubled batch)")
    image_size: int | None = _opt(None, int, "image side in pixels (default: the flavor's native "
                                  "size: latent side x 8, or x 1 with --vae identity)")
    per_proc_batch_size: int = _opt(32, int, "samples per rank per batch")
    num_fid_samples: int = _opt(50000, int, "number of samples to write")
    global_seed: int = _opt(0, int, "global seed; sample i's noise and label depend only on "
                            "(global seed, i)")
    # numerics and device
    device: str | None = _opt(None, str, "cpu | cuda (default: cuda when available)",
                              choices=("cpu", "cuda"))
    dtype: str = _opt("fp32", str, "model parameter dtype", choices=("fp32", "bf16", "fp16"))
    tf32: bool = _opt(False, bool, "allow TF32 matmuls (CUDA only)")
    # VAE and outputs
    vae: str = _opt("sd", str, "sd: AutoencoderKL from --vae-path; identity: the model output is "
                    "the image in [-1, 1] (1 or 3 channels); none: write latents only",
                    choices=("sd", "identity", "none"))
    vae_path: str | None = _opt(None, str, "local diffusers AutoencoderKL directory (--vae sd)")
    sample_dir: str | None = _opt(None, str, "output directory (default: samples/[EXTRA_FOLDER/]"
                                  "<name encoding model, mode and flags>[-EXTRA_NAME])")
    extra_name: str | None = _opt(None, str, "suffix of the automatic output directory name")
    extra_folder_name: str | None = _opt(None, str, "folder between samples/ and the automatic name")
    trim_samples: bool = _opt(False, bool, "decode and write only the first sample of each batch "
                              "(timing runs; no samples.npz)")
    # run control (issue 8: bounded failure, resume, console; not part of the sample fingerprint)
    pg_timeout: float | None = _opt(None, float, "seconds a collective may wait for a peer before "
                                    "the rank exits non-zero (every process group; default: "
                                    "$DICE_DS_PG_TIMEOUT or 300)")
    force_new: bool = _opt(False, bool, "the sample directory holds samples of other settings: "
                           "move them aside (to <dir>.old-<time>) and sample anew")
    verbose: bool = _opt(False, bool, "show third-party warnings and per-rank logs")
    # expert parallelism and DICE
    ep: bool = _opt(False, bool, "expert parallelism (sync EP); EP size = --ep-size or world size")
    ep_size: int | None = _opt(None, int, "expert-parallel group size (implies --ep; must divide "
                               "the world size and E)")
    ep_async: bool = _opt(False, bool, "displaced EP (needs --ep): 2-step-stale expert outputs")
    ep_async_pipeline: bool = _opt(False, bool, "interweaved EP (needs --ep-async): 1-step stale")
    ep_async_mode: str = _opt("shallow", str, "which MoE layers run async (the others stay sync): "
                              "all | shallow (l < L/2; DICE's setting = the paper's 'deep sync') | "
                              "deep (l >= L/2) | interleaved (even l)",
                              choices=("all", "shallow", "deep", "interleaved"))
    ep_async_layers: str | None = _opt(None, str, "explicit async layer indices, e.g. '0,1,5' "
                                       "(instead of --ep-async-mode)")
    ep_async_warm_up: int = _opt(0, int, "steps rev = 0..w run sync (w+1 sync steps)")
    ep_async_cool_down: int = _opt(0, int, "the last c steps run sync (works on its own)")
    strided_sync: int = _opt(0, int, "steps with i %% s == 0 run sync (0: off)")
    ep_async_noskip_step: int = _opt(1, int, "conditional communication: skip one slot per token "
                                     "on steps with i %% P != 0 (1: off)")
    ep_async_skip_strategy: str | None = _opt(None, str, "slot to skip (needs P > 1)",
                                              choices=("low", "high", "rand"))
    stale_output_weights: str | None = _opt(None, str, "router weights multiplying stale expert "
                                            "outputs: cached (the outputs' own step; default) | "
                                            "current (this step's)", choices=("cached", "current"))
    ep_score_use_latest: bool = _opt(False, bool, "reference flag; in the reference its presence "
                                     "selects the CACHED weights (the reverse of its name, spec "
                                     "§2.2.4), so here it means --stale-output-weights cached")
    a2a_dtype: str | None = _opt(None, str, "all-to-all payload dtype (default: activation dtype)",
                                 choices=("fp32", "bf16", "fp16"))
    auto_gc: bool = _opt(False, bool, "reference flag (needs --ep-async); the dice_ds runtime "
                         "manages exchange-buffer lifetimes itself, so it is only recorded")
    # sequence parallelism (dice_ds.parallel.sp)
    sp: bool = _opt(False, bool, "sequence (patch) parallelism: each image's tokens split over the "
                    "SP group, K/V all-gathered per attention layer; SP size = --sp-size or world "
                    "size / EP size")
    sp_size: int | None = _opt(None, int, "SP group size (implies --sp); with --ep, EP x SP must "
                               "divide the world size (2x2 mesh: --ep-size 2 --sp-size 2)")
    sp_async: bool = _opt(False, bool, "displaced SP / DistriFusion (needs --sp): remote K/V from "
                          "the previous step, own K/V fresh")
    sp_legacy_cache: bool = _opt(False, bool, "per-layer SP K/V cache (not implemented; the "
                                 "bucketed comm manager is always used)")
    single_img: bool = _opt(False, bool, "with --sp: the SP group samples one rank's batch at a "
                            "time (per-proc batch 1: one image spread over the group) instead of "
                            "the group's global batch; same image set")
    sp_async_warm_up: int = _opt(0, int, "displaced SP: steps rev = 0..w gather K/V "
                                 "synchronously (w+1 sync steps)")

    explicit: frozenset = field(default=frozenset(), metadata={"kind": None})
    """Names of the options given on the command line or in the JSON config."""
    local_rank: int | None = field(default=None, metadata={"kind": None})
    """``--local_rank`` appended by the deepspeed launcher (the device index on CUDA)."""


_ASYNC_ONLY = ("ep_async_pipeline", "ep_async_mode", "ep_async_layers", "ep_async_warm_up",
               "ep_async_cool_down", "strided_sync", "stale_output_weights", "ep_score_use_latest",
               "auto_gc")


def option_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RunOptions) if f.metadata.get("kind") is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dice-ds sample: error: ...`` on rank 0 only, exit code 2.

    Every rank of a launcher parses the same flags, so each exits 2 but only one line is printed."""

    def error(self, message: str):
        if env_rank() == 0:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr,
                  flush=True)
        raise SystemExit(2)


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


_ARG_TYPES = {int: _int_arg, float: _float_arg, str: str}


def _help_with_default(f: dataclasses.Field) -> str:
    h = f.metadata["help"]
    if f.metadata["kind"] is bool:
        return h + (" [default: on]" if f.default else " [default: off]")
    if f.default is None or "default" in h:
        return h
    return h + f" [default: {f.default}]"


def build_parser(prog: str = "dice-ds sample") -> argparse.ArgumentParser:
    """The parser; it has no defaults, so its namespace holds only the flags actually given.

    Boolean flags also have a ``--no-<flag>`` form, which clears a value set in ``--config``."""
    p = _Parser(prog=prog, argument_default=argparse.SUPPRESS,
                description="Sample images from a DiT-MoE, data- or expert-parallel (DICE). "
                            "Defaults are in [brackets]; boolean flags have a --no-<flag> form.")
    p.add_argument("--config", help="DeepSpeed-style JSON run config (configs/ds/*.json; layout in "
                                    "dice_ds/ds_config.py and the README); flags override it")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=_int_arg,
                   help=argparse.SUPPRESS)
    for f in option_fields():
        kind = f.metadata["kind"]
        if kind is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           help=_help_with_default(f))
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=_ARG_TYPES[kind],
                           help=_help_with_default(f), choices=f.metadata["choices"])
    return p


def load_json_config(path: str) -> dict:
    """Option values of the keys present in the DeepSpeed-style JSON config ``path``."""
    from dice_ds.ds_config import load_config

    return load_config(path)


def parse_options(argv: list[str] | None = None) -> RunOptions:
    """Parse flags, merge ``--config``; raises ConfigError (argparse errors exit with code 2)."""
    given = vars(build_parser().parse_args(argv))
    config_path = given.pop("config", None)
    local_rank = given.pop("local_rank", None)
    values = load_json_config(config_path) if config_path else {}
    values.update(given)
    return RunOptions(**values, explicit=frozenset(values), local_rank=local_rank)


# ---------------------------------------------------------------------------------------------------
# validation and derived values (no checkpoint, no process group)
# ---------------------------------------------------------------------------------------------------

DEFAULT_STEPS = {"rf": 50, "ddpm": 250, "ddim": 250}
DDPM_TRAIN_STEPS = 1000


def env_world_size() -> int:
    """World size announced by the launcher (torchrun/deepspeed ``WORLD_SIZE``, slurm), else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def env_rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def sampler_of(opts: RunOptions) -> str:
    return opts.sampler or get_flavor(opts.model).sampler


def steps_of(opts: RunOptions) -> int:
    if opts.num_sampling_steps is not None:  # 0 is an error (validate_options), never "default"
        return opts.num_sampling_steps
    return DEFAULT_STEPS[sampler_of(opts)]


def pixels_per_latent(opts: RunOptions) -> int:
    """Image pixels per latent cell: 8 for the SD VAE (and latents-only runs), 1 for identity."""
    return 1 if opts.vae == "identity" else 8


def image_size_of(opts: RunOptions) -> int:
    if opts.image_size is not None:
        return opts.image_size
    return get_flavor(opts.model).input_size * pixels_per_latent(opts)


def latent_side(opts: RunOptions) -> int:
    return image_size_of(opts) // pixels_per_latent(opts)


def async_layers_of(opts: RunOptions):
    if opts.ep_async_layers is None:
        return opts.ep_async_mode
    try:
        layers = tuple(int(s) for s in opts.ep_async_layers.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--ep-async-layers {opts.ep_async_layers!r}: use comma-separated layer "
                          "indices, e.g. 0,1,2") from None
    return layers


def ep_size_of(opts: RunOptions, world_size: int) -> int:
    """EP group size: --ep-size, else the world size with --ep (world / --sp-size with SP too),
    else 1 (pure data parallelism)."""
    if opts.ep_size is not None:
        return opts.ep_size
    if opts.ep and opts.sp_size is not None:
        return max(1, world_size // opts.sp_size)
    return world_size if opts.ep else 1


def stale_weights_of(opts: RunOptions) -> str:
    if opts.ep_score_use_latest and opts.stale_output_weights == "current":
        raise ConfigError("--ep-score-use-latest selects the cached weights (spec §2.2.4) and "
                          "contradicts --stale-output-weights current: drop one of them")
    return "cached" if opts.ep_score_use_latest else (opts.stale_output_weights or "cached")


def _validate_sp_flags(opts: RunOptions) -> None:
    if opts.sp_legacy_cache:
        raise ConfigError("--sp-legacy-cache: the per-layer SP cache is not implemented; displaced "
                          "SP always uses the bucketed comm manager (drop the flag)")
    if opts.sp_size is not None and opts.sp_size < 1:
        raise ConfigError(f"--sp-size {opts.sp_size} must be >= 1")
    sp_on = opts.sp or opts.sp_size is not None
    if opts.sp_async and not sp_on:
        raise ConfigError("--sp-async needs --sp (displaced SP runs on a sequence-parallel group)")
    if opts.sp_async_warm_up and not opts.sp_async:
        raise ConfigError("--sp-async-warm-up needs --sp-async")
    if opts.sp_async_warm_up < 0:
        raise ConfigError(f"--sp-async-warm-up {opts.sp_async_warm_up} must be >= 0")
    if opts.single_img and not sp_on:
        raise ConfigError("--single-img needs --sp")
    if sp_on and opts.ep and opts.ep_size is None and opts.sp_size is None:
        raise ConfigError("--ep with --sp: give --ep-size or --sp-size (EP x SP mesh, e.g. "
                          "--ep-size 2 --sp-size 2 on 4 ranks)")


def sp_size_of(opts: RunOptions, world_size: int) -> int:
    """SP group size: --sp-size, else world size / EP size with --sp, else 1."""
    if opts.sp_size is not None:
        return opts.sp_size
    if not opts.sp:
        return 1
    ep = opts.ep_size if opts.ep_size is not None else 1
    return max(1, world_size // ep)


def _validate_parallel_flags(opts: RunOptions) -> None:
    given = opts.explicit
    _validate_sp_flags(opts)
    ep_on = opts.ep or (opts.ep_size or 1) > 1
    if opts.ep_size is not None and opts.ep_size < 1:
        raise ConfigError(f"--ep-size {opts.ep_size} must be >= 1")
    if opts.ep_async and not ep_on:
        raise ConfigError("--ep-async needs --ep (displaced EP runs on an expert-parallel group)")
    if opts.ep_async_pipeline and not opts.ep_async:
        raise ConfigError("--ep-async-pipeline needs --ep-async (interweaved EP is a variant of "
                          "displaced EP)")
    skip_on = opts.ep_async_noskip_step != 1
    for name in _ASYNC_ONLY:
        weights_flag = name in ("stale_output_weights", "ep_score_use_latest")
        if name in given and getattr(opts, name) and not opts.ep_async \
                and not (weights_flag and skip_on):
            raise ConfigError(f"{_flag(name)} needs --ep-async (it only affects asynchronous EP)")
    if "ep_async_mode" in given and "ep_async_layers" in given:
        raise ConfigError("--ep-async-mode and --ep-async-layers both name the async layers: "
                          "give one of them")
    if opts.ep_async_skip_strategy is not None and not skip_on:
        raise ConfigError("--ep-async-skip-strategy has no effect with --ep-async-noskip-step 1: "
                          "set --ep-async-noskip-step P > 1 (e.g. 2) or drop it")
    if skip_on and not ep_on:
        raise ConfigError("--ep-async-noskip-step > 1 (conditional communication) needs --ep")
    stale_weights_of(opts)
    async_layers_of(opts)


def _validate_weights_and_vae(opts: RunOptions) -> None:
    if opts.ckpt is None and opts.init is None:
        raise ConfigError("no weights: pass --ckpt PATH, or --init random|dit for an untrained "
                          "smoke run")
    if opts.ckpt is not None and opts.init is not None:
        raise ConfigError("--ckpt and --init both set the weights: give one of them")
    if opts.ckpt is not None and os.path.isdir(opts.ckpt):
        raise ConfigError(f"--ckpt {opts.ckpt}: is a directory; pass the checkpoint file (.pt or "
                          ".safetensors)")
    if opts.ckpt is not None and not os.path.isfile(opts.ckpt):
        raise ConfigError(f"--ckpt {opts.ckpt}: no such file")
    if opts.vae == "sd":
        if opts.vae_path is None:
            raise ConfigError("--vae sd needs --vae-path DIR (a local diffusers AutoencoderKL, e.g. "
                              "sd-vae-ft-mse), or use --vae none to write latents only")
        if not os.path.isdir(opts.vae_path):
            raise ConfigError(f"--vae-path {opts.vae_path}: no such directory")
    elif opts.vae_path is not None:
        raise ConfigError(f"--vae-path is only used with --vae sd (got --vae {opts.vae})")
    if opts.trim_samples and opts.vae == "none":
        raise ConfigError("--trim-samples limits VAE decoding and has no effect with --vae none")


def _validate_sampling(opts: RunOptions) -> None:
    flavor = get_flavor(opts.model)
    if opts.cfg_scale < 1.0:
        raise ConfigError(f"--cfg-scale {opts.cfg_scale} must be >= 1 (1 disables guidance)")
    for name in ("per_proc_batch_size", "num_fid_samples"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"{_flag(name)} {getattr(opts, name)} must be >= 1")
    sampler, steps = sampler_of(opts), steps_of(opts)
    if steps < 1 or (sampler != "rf" and steps > DDPM_TRAIN_STEPS):
        raise ConfigError(f"--num-sampling-steps {steps} must be in [1, {DDPM_TRAIN_STEPS}] for "
                          f"{sampler} (>= 1 for rf)")
    if opts.num_experts is not None and opts.num_experts < flavor.top_k:
        raise ConfigError(f"--num-experts {opts.num_experts} must be >= top-k {flavor.top_k}")
    unit = pixels_per_latent(opts) * flavor.patch_size
    size = image_size_of(opts)
    if size < unit or size % unit:
        where = "x patch size" if unit == flavor.patch_size else "8 x patch size (SD VAE)"
        raise ConfigError(f"--image-size {size} must be a positive multiple of {unit} ({where}) for "
                          f"{flavor.name}")
    if opts.pg_timeout is not None and opts.pg_timeout <= 0:
        raise ConfigError(f"--pg-timeout {opts.pg_timeout:g} must be > 0 (seconds)")
    if opts.device == "cpu" and opts.tf32:
        raise ConfigError("--tf32 only affects CUDA matmuls: drop it or use --device cuda")
    if opts.sample_dir is not None and (opts.extra_name or opts.extra_folder_name):
        raise ConfigError("--extra-name/--extra-folder-name shape the automatic output directory "
                          "and are unused with --sample-dir: give one or the other")


# (option, smallest allowed value, what the bound means); None values are "unset" and skip the check
_LOWER_BOUNDS = (
    ("num_experts", 1, "a count"), ("depth", 1, "a block count"), ("init_seed", 0, "a seed"),
    ("num_sampling_steps", 1, "a count"),
    ("image_size", 1, "pixels"), ("per_proc_batch_size", 1, "a count"),
    ("num_fid_samples", 1, "a count"), ("global_seed", 0, "a seed"), ("ep_size", 1, "a group size"),
    ("ep_async_warm_up", 0, "a step count"), ("ep_async_cool_down", 0, "a step count"),
    ("strided_sync", 0, "a stride; 0 is off"), ("ep_async_noskip_step", 1, "a period; 1 is off"),
)
_SEED_MAX = 2**63 - 1


def _validate_values(opts: RunOptions) -> None:
    """Types, ranges and finiteness of single options (JSON and flags both end up here)."""
    for f in option_fields():
        value, kind = getattr(opts, f.name), f.metadata["kind"]
        if value is None:
            continue
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
            raise ConfigError(f"{_flag(f.name)} {value!r}: must be a finite number")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{_flag(f.name)} {value!r}: must be an integer")
    for name, low, what in _LOWER_BOUNDS:
        value = getattr(opts, name, None)
        if value is not None and value < low:
            raise ConfigError(f"{_flag(name)} {value} must be >= {low} ({what})")
    for name in ("global_seed", "init_seed"):
        if getattr(opts, name) > _SEED_MAX:
            raise ConfigError(f"{_flag(name)} {getattr(opts, name)} must be < 2^63")


def _validate_sample_dir(opts: RunOptions) -> None:
    """--sample-dir must be (or be creatable as) a writable directory."""
    if opts.sample_dir is None:
        return
    path = os.path.abspath(opts.sample_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--sample-dir {opts.sample_dir}: exists and is not a directory; choose "
                          "another path")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"--sample-dir {opts.sample_dir}: a parent ({probe}) is not a directory; "
                          "choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        raise ConfigError(f"--sample-dir {opts.sample_dir}: {where}; choose a writable directory")


def validate_options(opts: RunOptions) -> RunOptions:
    """Every check that needs neither the checkpoint nor a process group; raises ConfigError."""
    get_flavor(opts.model)
    _validate_values(opts)
    _validate_sample_dir(opts)
    _validate_parallel_flags(opts)
    _validate_weights_and_vae(opts)
    _validate_sampling(opts)
    return opts


def build_plan(opts: RunOptions, *, world_size: int, num_experts: int, depth: int):
    """The validated ``ParallelPlan`` of these options (needs the real expert count E)."""
    from dice_ds.parallel.plan import ParallelPlan

    mode = ("interweaved" if opts.ep_async_pipeline else "displaced") if opts.ep_async else "sync"
    plan = ParallelPlan(
        ep_size=ep_size_of(opts, world_size),
        mode=mode,
        async_layers=async_layers_of(opts),
        warmup=opts.ep_async_warm_up,
        cooldown=opts.ep_async_cool_down,
        strided=opts.strided_sync,
        stale_output_weights=stale_weights_of(opts),
        skip_period=opts.ep_async_noskip_step,
        skip_strategy=opts.ep_async_skip_strategy,
        skip_seed=opts.global_seed,
        payload_dtype=opts.a2a_dtype,
        sp_size=sp_size_of(opts, world_size),
        sp_async=opts.sp_async,
        sp_warmup=opts.sp_async_warm_up,
        single_img=opts.single_img,
    )
    tokens = (latent_side(opts) // get_flavor(opts.model).patch_size) ** 2
    return plan.validate(world_size=world_size, num_experts=num_experts, depth=depth,
                         sampler=sampler_of(opts), tokens=tokens)


def mode_name(plan) -> str:
    """'dp', 'ep' (sync), 'displaced' or 'interweaved'; with SP 'sp' / 'displaced_sp', joined
    to the EP name by '+' (e.g. 'ep+sp')."""
    sp = ("displaced_sp" if plan.sp_async else "sp") if plan.sp_enabled else None
    if not plan.ep_enabled:
        return sp or "dp"
    ep = "ep" if plan.mode == "sync" else plan.mode
    return f"{ep}+{sp}" if sp else ep


def _sp_tag(plan) -> str:
    if not plan.sp_enabled:
        return ""
    tag = ("DF" if plan.sp_async else "SP") + str(plan.sp_size)
    tag += f"-spwu{plan.sp_warmup}" if plan.sp_warmup else ""
    return tag + ("-1img" if plan.single_img else "")


def _mode_tag(opts: RunOptions, plan) -> str:
    if not plan.ep_enabled:
        return _sp_tag(plan) or "DP"
    if plan.sp_enabled:
        return _ep_tag(opts, plan) + "+" + _sp_tag(plan)
    return _ep_tag(opts, plan)


def _ep_tag(opts: RunOptions, plan) -> str:
    tag = {"sync": "EP", "displaced": "DiEP", "interweaved": "IwEP"}[plan.mode] + str(plan.ep_size)
    if plan.async_enabled:
        layers = plan.async_layers
        tag += "-" + (layers if isinstance(layers, str) else "L" + ".".join(map(str, layers)))
        for short, value in (("wu", plan.warmup), ("cd", plan.cooldown), ("st", plan.strided)):
            tag += f"-{short}{value}" if value else ""
        tag += f"-w{plan.stale_output_weights}"
        tag += "-gc" if opts.auto_gc else ""
    if plan.skip_period > 1:
        tag += f"-skip{plan.skip_period}{plan.skip_strategy}"
    return tag + (f"-a2a{plan.payload_dtype}" if plan.payload_dtype else "")


def auto_sample_dir(opts: RunOptions, plan, world_size: int, root: str = "samples") -> str:
    """``samples/[extra folder/]<model>-<weights>-<size>-<sampler+steps>-cfg-seed-bs-dtype-<mode>-W``."""
    weights = (os.path.splitext(os.path.basename(opts.ckpt))[0] if opts.ckpt
               else f"init{opts.init}{opts.init_seed}")
    model = opts.model.replace("/", "-") + (f"-d{opts.depth}" if opts.depth else "")
    parts = [model, weights, f"{image_size_of(opts)}px", f"vae{opts.vae}",
             f"{sampler_of(opts)}{steps_of(opts)}", f"cfg{opts.cfg_scale:g}",
             f"seed{opts.global_seed}", f"bs{opts.per_proc_batch_size}", opts.dtype,
             _mode_tag(opts, plan), f"W{world_size}"]
    if opts.trim_samples:
        parts.append("trim")
    name = "-".join(parts) + (f"-{opts.extra_name}" if opts.extra_name else "")
    folder = os.path.join(root, opts.extra_folder_name) if opts.extra_folder_name else root
    return os.path.join(folder, name)
