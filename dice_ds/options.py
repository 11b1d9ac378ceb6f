"""The command line of ``dice-ds sample``, generated from the settings tree, and the run's rules.

Owns ``build_parser`` (argparse generated from ``dice_ds.ds_config.LEAVES`` and ``ALIASES``: one
flag per keyword name, ``--cfg-scale`` for ``cfg_scale``, plus the reference's aliases; types,
choices, defaults and help come from the tree; boolean flags have ``--no-<flag>`` forms),
``parse_options`` (tree defaults < ``--config FILE.json`` < flags given on the command line), the
cross-field rules that need no checkpoint and no process group (``validate_options``: flag
combinations, files, ``--sample-dir``; single values -- types, ranges, choices -- are checked by the
tree itself when it is built), the values derived from the settings (sampler and step defaults,
image size, EP/SP sizes), ``build_plan`` (the ``ParallelPlan``, built one to one from the tree's
parallelism sections by ``plan_of`` and validated with the model's expert count and depth),
``validate`` (every model-dependent check, in one place), ``from_overrides`` / ``from_tree``
(settings from keyword values or a JSON tree over a base), ``flags_of`` (keyword values as ``dice-ds
sample`` flags, for the commands a sweep launches and for display) and the automatic sample
directory name. The bad inputs and their messages are listed in ``docs/bad-inputs.md``.

Invariants: nothing here imports torch or starts a process group; every bad input raises
``ConfigError`` with one line naming the flag and the fix.

Reference-compatible flags (DICE ``sample_ddp.py``, spec §2.0) keep their names; where a reference
flag is misleading the mapping is documented in its help text (``--ep-score-use-latest``).
"""

from __future__ import annotations

import argparse
import math
import os

from dice_ds.config import ConfigError, ModelConfig, get_flavor
from dice_ds.ds_config import (
    ALIASES,
    LEAVES,
    MAX_STEPS,
    NAMES,
    Settings,
    check_tree,
    flag_name,
    load_tree,
    merge,
    names_of,
    settings_of,
    to_json,
    tree_of,
)
from dice_ds.error_line import print_error_line
from dice_ds.parallel.plan import ParallelPlan

RunOptions = Settings
"""The settings of one run (the tree of ``dice_ds.ds_config``)."""


def option_flags() -> list[str]:
    """Every flag of ``dice-ds sample`` that sets a setting (the first name of each)."""
    return [lf.flags[0] for lf in LEAVES] + [a.flags[0] for a in ALIASES.values()]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dice-ds sample: error: ...``, exit code 2.

    Every rank of a launcher parses the same flags; each rank that fails prints the line itself
    (once per launcher: ``dice_ds.error_line``), so a launcher stopping the ranks cannot hide it."""

    def error(self, message: str):
        print_error_line(self.prog, f"{message} (see {self.prog} --help)")
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


def _help(text: str, kind, default) -> str:
    if kind is bool:
        return text + (" [default: on]" if default else " [default: off]")
    if default is None or "default" in text:
        return text
    return text + f" [default: {default}]"


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
    for x in (*LEAVES, *ALIASES.values()):
        if x.kind is bool:
            p.add_argument(*x.flags, dest=x.name, action=argparse.BooleanOptionalAction,
                           help=_help(x.help, bool, x.default))
        else:
            p.add_argument(*x.flags, dest=x.name, type=_ARG_TYPES[x.kind], choices=x.choices,
                           help=_help(x.help, x.kind, x.default))
    return p


def load_json_config(path: str) -> dict:
    """Keyword values of the keys present in the DeepSpeed-style JSON config ``path``."""
    return names_of(load_tree(path))


def parse_options(argv: list[str] | None = None) -> Settings:
    """Parse flags, merge ``--config``; raises ConfigError (argparse errors exit with code 2)."""
    given = vars(build_parser().parse_args(argv))
    config_path = given.pop("config", None)
    local_rank = given.pop("local_rank", None)
    base = load_tree(config_path) if config_path else {}
    top = check_tree(tree_of(given), "flags", flags=True)
    return settings_of(merge(base, top), explicit={*names_of(base), *given},
                       local_rank=local_rank)


def from_overrides(values: dict, base: Settings | None = None) -> Settings:
    """``base`` (default: the tree's defaults) with keyword ``values`` over it; errors name the
    flags (what modes and bench jobs pass is a ``dice-ds sample`` command's settings)."""
    unknown = sorted(set(values) - NAMES)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    top = check_tree(tree_of(values), "settings", flags=True)
    if base is None:
        return settings_of(top, explicit=values)
    return settings_of(merge(to_json(base), top), explicit={*base.explicit, *values})


def given(s: Settings) -> dict:
    """The keyword values given by the user (``explicit``)."""
    return {n: getattr(s, n) for n in sorted(s.explicit)}


def from_tree(tree: dict, source: str = "settings") -> Settings:
    """``Settings`` of a (partial) JSON tree such as ``to_json`` writes; its keys count as given."""
    check_tree(tree, source)
    return settings_of(tree, explicit=names_of(tree))


def flags_of(values: dict) -> list[str]:
    """Keyword values as ``dice-ds sample`` flags (``True`` -> ``--ep``, ``False`` -> ``--no-ep``;
    ``None`` values are the default and give no flag)."""
    out: list[str] = []
    for name, value in values.items():
        if name not in NAMES:
            raise ConfigError(f"unknown setting {name!r}")
        if value is None:
            continue
        flag = flag_name(name)
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


# ---------------------------------------------------------------------------------------------------
# derived values (no checkpoint, no process group)
# ---------------------------------------------------------------------------------------------------

DEFAULT_STEPS = {"rf": 50, "ddpm": 250, "ddim": 250}


def sampler_of(opts: Settings) -> str:
    return opts.sampler or get_flavor(opts.model).sampler


def steps_of(opts: Settings) -> int:
    if opts.num_sampling_steps is not None:  # 0 is an error (the tree's range), never "default"
        return opts.num_sampling_steps
    return DEFAULT_STEPS[sampler_of(opts)]


def pixels_per_latent(opts: Settings) -> int:
    """Image pixels per latent cell: 8 for the SD VAE (and latents-only runs), 1 for identity."""
    return 1 if opts.vae == "identity" else 8


def image_size_of(opts: Settings) -> int:
    if opts.image_size is not None:
        return opts.image_size
    return get_flavor(opts.model).input_size * pixels_per_latent(opts)


def latent_side(opts: Settings) -> int:
    return image_size_of(opts) // pixels_per_latent(opts)


def tokens_of(opts: Settings) -> int:
    """Tokens of one image."""
    return (latent_side(opts) // get_flavor(opts.model).patch_size) ** 2


def async_layers_of(opts: Settings):
    layers = opts.dice.async_.layers
    return layers if isinstance(layers, str) else tuple(layers)


def ep_size_of(opts: Settings, world_size: int) -> int:
    """EP group size: --ep-size, else the world size with --ep (world / --sp-size with SP too),
    else 1 (pure data parallelism)."""
    if opts.ep_size is not None:
        return opts.ep_size
    if opts.ep and opts.sp_size is not None:
        return max(1, world_size // opts.sp_size)
    return world_size if opts.ep else 1


def sp_size_of(opts: Settings, world_size: int) -> int:
    """SP group size: --sp-size, else world size / EP size with --sp, else 1."""
    if opts.sp_size is not None:
        return opts.sp_size
    if not opts.sp:
        return 1
    ep = opts.ep_size if opts.ep_size is not None else 1
    return max(1, world_size // ep)


# ---------------------------------------------------------------------------------------------------
# cross-field rules (each checked here once; single values are the tree's)
# ---------------------------------------------------------------------------------------------------

_ASYNC_ONLY = ("ep_async_pipeline", "ep_async_mode", "ep_async_layers", "ep_async_warm_up",
               "ep_async_cool_down", "strided_sync", "stale_output_weights", "ep_score_use_latest")


def _validate_sp_flags(opts: Settings) -> None:
    # --sp-async, --single-img, --sp-async-warm-up without SP: the plan's rules (a size, not a flag)
    sp_on = opts.sp or opts.sp_size is not None
    if sp_on and opts.ep and opts.ep_size is None and opts.sp_size is None:
        raise ConfigError("--ep with --sp: give --ep-size or --sp-size (EP x SP mesh, e.g. "
                          "--ep-size 2 --sp-size 2 on 4 ranks)")


def _validate_parallel_flags(opts: Settings) -> None:
    given = opts.explicit
    _validate_sp_flags(opts)
    # --ep-async and --ep-async-noskip-step > 1 without EP: the plan's rules (an EP size > 1)
    if opts.ep_async_pipeline and not opts.ep_async:
        raise ConfigError("--ep-async-pipeline needs --ep-async (interweaved EP is a variant of "
                          "displaced EP)")
    skip_on = opts.ep_async_noskip_step != 1
    for name in _ASYNC_ONLY:
        weights_flag = name in ("stale_output_weights", "ep_score_use_latest")
        if name in given and getattr(opts, name) and not opts.ep_async and not (weights_flag and skip_on):
            raise ConfigError(f"{flag_name(name)} needs --ep-async (it only affects asynchronous "
                              "EP)")
    if opts.ep_async_skip_strategy is not None and not skip_on:
        raise ConfigError("--ep-async-skip-strategy has no effect with --ep-async-noskip-step 1: "
                          "set --ep-async-noskip-step P > 1 (e.g. 2) or drop it")


def _validate_weights_and_vae(opts: Settings) -> None:
    if opts.ckpt is None and opts.init is None:
        raise ConfigError("no weights: pass --ckpt PATH, or --init random|dit for an untrained "
                          "smoke run")
    if opts.ckpt is not None and opts.init is not None:
        raise ConfigError("--ckpt and --init both set the weights: give one of them")
    if "init_seed" in opts.explicit and opts.init is None:
        raise ConfigError(f"--init-seed {opts.init_seed} seeds --init's random weights and does "
                          "nothing with --ckpt: drop it")
    if opts.vae == "sd":
        if opts.vae_path is None:
            raise ConfigError("--vae sd needs --vae-path DIR (a local diffusers AutoencoderKL, e.g. "
                              "sd-vae-ft-mse), or use --vae none to write latents only")
        if os.path.exists(opts.vae_path) and not os.path.isdir(opts.vae_path):
            raise ConfigError(f"--vae-path {opts.vae_path}: is not a directory; give the "
                              "diffusers AutoencoderKL directory (holding config.json)")
        if not os.path.isdir(opts.vae_path):
            raise ConfigError(f"--vae-path {opts.vae_path}: no such directory")
    elif opts.vae_path is not None:
        raise ConfigError(f"--vae-path is only used with --vae sd (got --vae {opts.vae})")
    if opts.trim_samples and opts.vae == "none":
        raise ConfigError("--trim-samples limits VAE decoding and has no effect with --vae none")


def _validate_sampling(opts: Settings) -> None:
    flavor = get_flavor(opts.model)
    sampler, steps = sampler_of(opts), steps_of(opts)
    if steps > MAX_STEPS[sampler]:  # the reasons: dice_ds/ds_config.py
        raise ConfigError(f"--num-sampling-steps {steps} must be in [1, {MAX_STEPS[sampler]}] for "
                          f"{sampler} ({', '.join(f'{k}: {v}' for k, v in MAX_STEPS.items())})")
    if opts.num_experts is not None and opts.num_experts < flavor.top_k:
        raise ConfigError(f"--num-experts {opts.num_experts} must be >= top-k {flavor.top_k}")
    unit = pixels_per_latent(opts) * flavor.patch_size
    size = image_size_of(opts)
    if size < unit or size % unit:
        where = "x patch size" if unit == flavor.patch_size else "8 x patch size (SD VAE)"
        raise ConfigError(f"--image-size {size} must be a positive multiple of {unit} ({where}) for "
                          f"{flavor.name}")
    if opts.sample_dir is not None and (opts.extra_name or opts.extra_folder_name):
        raise ConfigError("--extra-name/--extra-folder-name shape the automatic output directory "
                          "and are unused with --sample-dir: give one or the other")


def check_sample_dir(sample_dir: str, shown: str = "--sample-dir") -> str:
    """``sample_dir`` if it is (or can be created as) a writable directory, else one ConfigError
    line starting ``shown`` (the flag, or what names the automatic directory). A symbolic link
    whose target is missing (on the path or the directory itself) is refused: creating it would
    fail with a traceback, or write where the user did not look."""
    path = os.path.abspath(sample_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{shown} {sample_dir}: exists and is not a directory; choose "
                          "another path")
    probe = path
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise ConfigError(f"{shown} {sample_dir}: {probe} is a symbolic link to "
                              f"{os.readlink(probe)}, which does not exist; create its target "
                              "or choose another path")
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{shown} {sample_dir}: a parent ({probe}) is not a directory; "
                          "choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        raise ConfigError(f"{shown} {sample_dir}: {where}; choose a writable directory")
    return sample_dir


def _validate_sample_dir(opts: Settings) -> None:
    """--sample-dir must be (or be creatable as) a writable directory (an empty one is the
    tree's error: ``dice_ds/ds_config.py``)."""
    if opts.sample_dir is not None:
        check_sample_dir(opts.sample_dir)


def validate_options(opts: Settings) -> Settings:
    """Every cross-field check that needs neither the checkpoint nor a process group (the
    checkpoint file is read, and its existence checked, by ``dice_ds.preflight``); raises
    ConfigError."""
    _validate_sample_dir(opts)
    _validate_parallel_flags(opts)
    _validate_weights_and_vae(opts)
    _validate_sampling(opts)
    return opts


def plan_of(opts: Settings, world_size: int) -> ParallelPlan:
    """The ``ParallelPlan`` of the tree's parallelism sections (``moe``, ``dice.async``,
    ``dice.conditional_comm``, ``dice.communication``, ``dice.sp``), not validated."""
    a, d = opts.dice.async_, opts.dice
    mode = a.mode if opts.ep_async else "sync"
    return ParallelPlan(
        ep_size=ep_size_of(opts, world_size), mode=mode, async_layers=async_layers_of(opts),
        warmup=a.warm_up, cooldown=a.cool_down, strided=a.strided_sync,
        stale_output_weights=a.stale_output_weights,
        skip_period=d.conditional_comm.period, skip_strategy=d.conditional_comm.strategy,
        skip_seed=opts.global_seed, payload_dtype=d.communication.payload_dtype,
        ep_overlap=d.communication.overlap,
        sp_size=sp_size_of(opts, world_size), sp_async=d.sp.async_,
        sp_warmup=d.sp.async_warm_up, single_img=d.sp.single_img)


def validate(opts: Settings, world_size: int, model: ModelConfig) -> ParallelPlan:
    """The model-dependent checks, in one place (after ``validate_options``, before any process
    group): the sampler against the model (DDPM needs a learned variance), and the plan against
    the world size, the model's real expert count and depth and an image's tokens. Returns the
    validated plan."""
    if sampler_of(opts) == "ddpm" and not model.learn_sigma:
        raise ConfigError(f"--sampler ddpm needs a model with learned variance (learn_sigma); "
                          f"{model.name} has none: use --sampler ddim or rf")
    return build_plan(opts, world_size=world_size, num_experts=model.num_experts,
                      depth=model.depth)


def build_plan(opts: Settings, *, world_size: int, num_experts: int, depth: int) -> ParallelPlan:
    """The validated ``ParallelPlan`` of these settings: the model-dependent checks (the real
    expert count E and depth, the world size, the tokens of an image)."""
    return plan_of(opts, world_size).validate(world_size=world_size, num_experts=num_experts,
                                              depth=depth, tokens=tokens_of(opts))


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


def _mode_tag(plan) -> str:
    if not plan.ep_enabled:
        return _sp_tag(plan) or "DP"
    if plan.sp_enabled:
        return _ep_tag(plan) + "+" + _sp_tag(plan)
    return _ep_tag(plan)


def _ep_tag(plan) -> str:
    tag = {"sync": "EP", "displaced": "DiEP", "interweaved": "IwEP"}[plan.mode] + str(plan.ep_size)
    if plan.async_enabled:
        layers = plan.async_layers
        tag += "-" + (layers if isinstance(layers, str) else "L" + ".".join(map(str, layers)))
        for short, value in (("wu", plan.warmup), ("cd", plan.cooldown), ("st", plan.strided)):
            tag += f"-{short}{value}" if value else ""
        tag += f"-w{plan.stale_output_weights}"
    if plan.skip_period > 1:
        tag += f"-skip{plan.skip_period}{plan.skip_strategy}"
    return tag + (f"-a2a{plan.payload_dtype}" if plan.payload_dtype else "")


def auto_sample_dir(opts: Settings, plan, world_size: int, root: str = "samples") -> str:
    """``samples/[extra folder/]<model>-<weights>-<size>-<sampler+steps>-cfg-seed-bs-dtype-<mode>-W``."""
    weights = (os.path.splitext(os.path.basename(opts.ckpt))[0] if opts.ckpt
               else f"init{opts.init}{opts.init_seed}")
    model = opts.model.replace("/", "-") + (f"-d{opts.depth}" if opts.depth else "")
    parts = [model, weights, f"{image_size_of(opts)}px", f"vae{opts.vae}",
             f"{sampler_of(opts)}{steps_of(opts)}", f"cfg{opts.cfg_scale:g}",
             f"seed{opts.global_seed}", f"bs{opts.per_proc_batch_size}", opts.dtype,
             _mode_tag(plan), f"W{world_size}"]
    if opts.trim_samples:
        parts.append("trim")
    name = "-".join(parts) + (f"-{opts.extra_name}" if opts.extra_name else "")
    folder = os.path.join(root, opts.extra_folder_name) if opts.extra_folder_name else root
    return os.path.join(folder, name)
