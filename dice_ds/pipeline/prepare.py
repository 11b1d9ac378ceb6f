"""What a pipeline is built from, decided before any process group starts; and the process groups.

Owns ``PipelineSpec`` (validated options, model config, parallel plan, world size, device, the
checkpoint reader, the start-up log), ``prepare_spec`` (every check of the run's settings: options,
checkpoint header, model config, decoder, plan), ``pipeline_options`` (how ``from_pretrained``
merges its arguments into the settings tree) and ``connect`` (the default process group).

Invariants: ``prepare_spec`` and ``pipeline_options`` start no process group and read no tensor; every
bad input raises ``ConfigError`` with one line naming the field and the fix (``keyword_message``
turns the CLI's ``--flag`` names into the keyword names the pipeline takes). ``connect`` reuses an
initialised default group, else starts one from the launcher's environment (torchrun, deepspeed,
slurm), else a 1-rank world.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dice_ds.config import ConfigError, ModelConfig, get_flavor
from dice_ds.ds_config import (
    ALIASES,
    LEAVES,
    NAMES,
    Settings,
    check_tree,
    config_values,
    dtype_name,
    load_config,
    merge,
    settings_of,
    shipped_path,
    tree_of,
)
from dice_ds.launch_env import env_world_size
from dice_ds.options import latent_side, validate, validate_options
from dice_ds.parallel.apply import parallelize_dit_moe
from dice_ds.parallel.groups import init_distributed
from dice_ds.pipeline.resources import check_memory
from dice_ds.placement import placement_setting, replicas_of
from dice_ds.startup import StartupLog
from dice_ds.vae import check_decoder
from dice_ds.weights.check import (
    REGENERATE_FLAG,
    REGENERATED,
    check_architecture,
    check_complete,
    config_for_checkpoint,
)
from dice_ds.weights.read import open_checkpoint

SHIPPED = {"digits": {"model": "digits", "ckpt": shipped_path("digits")}}
"""Models shipped with dice_ds, by name: their options (pixel space: ``vae`` defaults to identity)."""
SHIPPED_DEFAULTS = {"digits": {"vae": "identity"}}
JOB_OPTIONS = ("sample_dir", "extra_name", "extra_folder_name", "trim_samples", "force_new",
               "num_fid_samples", "per_proc_batch_size")
"""Options of the ``dice-ds sample`` job (sample directory, batch loop), not of the model or
the run: a config file's values are ignored by the pipeline, a keyword naming one is refused."""


@dataclass
class PipelineSpec:
    """Everything decided before the process group starts."""

    opts: Settings
    model_cfg: ModelConfig
    plan: object
    world_size: int
    device: str
    checkpoint: object | None
    """A streaming reader of ``ckpt`` (``dice_ds.weights.read``), or None (random weights); the
    build consumes it (None afterwards)."""
    parallelize: object | None
    """``dice_ds.parallel.apply.parallelize_dit_moe`` (None: the pipeline attaches no runtime)."""
    startup: object = None
    """This rank's ``dice_ds.startup.StartupLog`` (phases, bytes read, memory; run.json)."""
    placement: object = None
    """The expert placement (``dice_ds.placement``: a ``Placement``, ``BALANCED`` to compute
    at start-up, None for megatron's contiguous one); the build replaces ``BALANCED`` by the
    computed ``Placement``."""
    checkpoint_notes: tuple[str, ...] = ()
    """What ``check_architecture`` had to assume about the checkpoint (a file without metadata:
    heads, image size) or replaced (``pos_embed`` with ``--regenerate-pos-embed``): stated once in
    the log (rank 0, ``state_checkpoint_notes``) and in run.json (``checkpoint_notes``)."""

    @property
    def regenerated_pos_embed(self) -> bool:
        """The checkpoint's ``pos_embed`` is replaced (``--regenerate-pos-embed`` was needed)."""
        return any(n.startswith(REGENERATED) for n in self.checkpoint_notes)


def resolve_device(opts: Settings) -> str:
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.tf32 and device != "cuda":
        raise ConfigError("--tf32 only affects CUDA matmuls: drop it or use --device cuda")
    return device


def model_config(opts: Settings) -> tuple[ModelConfig, object | None, tuple[str, ...]]:
    """The model's config (expert count and shapes from the checkpoint header), its reader and
    what ``check_architecture`` assumed or replaced (empty without a checkpoint)."""
    flavor = get_flavor(opts.model)
    if opts.depth is not None:  # a reduced-depth variant: full width, fewer blocks
        flavor = flavor.replace(depth=opts.depth)
    side = latent_side(opts)
    if opts.ckpt is None:
        if opts.regenerate_pos_embed:
            raise ConfigError(f"{REGENERATE_FLAG} only applies to a --ckpt made for another image "
                              "size (random weights have no table to replace): drop it")
        cfg = flavor.replace(num_experts=opts.num_experts or flavor.num_experts)
        return cfg.replace(input_size=side).validate(), None, ()
    reader = open_checkpoint(opts.ckpt)  # any unreadable file: one ConfigError line
    shapes = reader.meta_state_dict()  # names, dtypes, shapes: no tensor is read yet
    cfg = config_for_checkpoint(flavor, shapes, num_experts=opts.num_experts)
    check_complete(shapes, cfg, opts.ckpt)  # missing keys: before the process group, not at load
    # metadata; another latent size only with --regenerate-pos-embed (load_into_model replaces it)
    notes = check_architecture(reader, cfg.replace(input_size=side),
                               regenerate_pos_embed=opts.regenerate_pos_embed)
    return cfg.replace(input_size=side).validate(), reader, tuple(notes)


def parallelize_fn(plan):
    """``parallelize_dit_moe``: every plan goes through it (DP included: it then only measures)."""
    return parallelize_dit_moe


def default_world_size() -> int:
    """The initialised default group's size, else what the launcher announced, else 1."""
    return dist.get_world_size() if dist.is_initialized() else env_world_size()


def prepare_spec(opts: Settings, world_size: int | None = None) -> PipelineSpec:
    """Resolve everything that can fail on bad input; raises ConfigError. Starts no process group.

    ``world_size``: the number of ranks the run will have (default: what the launcher announced
    in the environment, else 1; the pipeline passes ``default_world_size()``).
    """
    validate_options(opts)
    world = world_size or env_world_size()
    device = resolve_device(opts)
    cfg, reader, notes = model_config(opts)
    check_decoder(opts.vae, opts.vae_path, cfg.in_channels)
    plan = validate(opts, world, cfg)
    placement = placement_setting(opts.expert_placement, opts.expert_replicas,
                                  num_experts=cfg.num_experts, ep_size=plan.ep_size,
                                  depth=cfg.depth)
    # before anything is built: one line if it cannot fit
    check_memory(opts, cfg, plan, device, replicas_of(placement, opts.expert_replicas))
    return PipelineSpec(opts, cfg, plan, world, device, reader, parallelize_fn(plan),
                        startup=StartupLog(), checkpoint_notes=notes, placement=placement)


def state_checkpoint_notes(spec: PipelineSpec, rank: int) -> None:
    """Rank 0 states, once, what was assumed about the checkpoint or replaced in it (one line
    each on stderr: ``dice-ds: note: --ckpt PATH: NOTE``); the other ranks stay silent."""
    if rank == 0:
        for note in spec.checkpoint_notes:
            print(f"dice-ds: note: --ckpt {spec.opts.ckpt}: {note}", file=sys.stderr, flush=True)


def local_rank(opts: Settings) -> int:
    if opts.local_rank is not None:
        return opts.local_rank
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def connect(spec: PipelineSpec) -> tuple[int, int]:
    """The default process group (reused when initialised); returns (rank, world size)."""
    opts = spec.opts
    if spec.device == "cuda":
        torch.cuda.set_device(local_rank(opts))
        torch.backends.cuda.matmul.allow_tf32 = opts.tf32
        torch.backends.cudnn.allow_tf32 = opts.tf32
    with spec.startup.phase("process_groups"):
        rank, world = init_distributed(spec.device, timeout=opts.pg_timeout)
    if world != spec.world_size:
        raise RuntimeError(f"world size {world} differs from the launcher's {spec.world_size}")
    return rank, world


# ---------------------------------------------------------------------------------------------------
# from_pretrained's arguments -> the settings tree
# ---------------------------------------------------------------------------------------------------


def _config_values(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config_values(config, "config dict")
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config))
    raise ConfigError(f"config={type(config).__name__}: pass a ds_config path (configs/ds/*.json) "
                      "or a dict in that layout")


def _weights_of(name) -> dict:
    """Settings naming the weights of ``from_pretrained``'s first argument."""
    if name is None:
        return {}
    if not isinstance(name, (str, os.PathLike)):
        raise ConfigError(f"from_pretrained({name!r}): pass a checkpoint path, a shipped model "
                          f"({', '.join(SHIPPED)}) or a model flavor name (a str; got "
                          f"{type(name).__name__})")
    name = os.fspath(name)
    if name in SHIPPED:
        return dict(SHIPPED[name], init=None)
    if os.path.exists(name) or name.endswith((".pt", ".pth", ".safetensors")):
        return {"ckpt": name, "init": None}
    try:
        get_flavor(name)
    except ConfigError:
        raise ConfigError(f"from_pretrained({name!r}): not a checkpoint file, a shipped model "
                          f"({', '.join(SHIPPED)}) or a model flavor (e.g. debug, DiT-XL/2 with "
                          "init='random')") from None
    return {"model": name, "ckpt": None}


def _device_name(device) -> str:
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r}: use 'cpu' or 'cuda'") from None


def _check_overrides(overrides: dict) -> None:
    kinds = {x.name: x.kind for x in (*LEAVES, *ALIASES.values())}
    for key, value in overrides.items():
        if key in JOB_OPTIONS:
            raise ConfigError(f"{key}: an option of the dice-ds sample job (sample directory, batch "
                              "loop), not of the pipeline: a call's batch is its class_labels")
        if key not in kinds:
            raise ConfigError(f"unknown option {key!r}: pass settings keywords (e.g. ep=True, "
                              "ep_async=True, cfg_scale=2.0, num_sampling_steps=20, vae='none')")
        if kinds[key] is bool and not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be True or False")


def pipeline_options(name=None, config=None, device=None, dtype=None, **overrides) -> Settings:
    """The ``Settings`` of ``DiTMoEPipeline.from_pretrained``: the tree's defaults < a shipped
    model's defaults < ``config`` (its job settings dropped) < the weights ``name`` names <
    ``device``, ``dtype`` and ``overrides`` (keyword names of ``dice_ds.ds_config``), each source
    merged over the one before as a tree."""
    _check_overrides(overrides)
    key = os.fspath(name) if isinstance(name, (str, os.PathLike)) else name
    config_values = {k: v for k, v in _config_values(config).items() if k not in JOB_OPTIONS}
    call = {}
    if device is not None:
        call["device"] = _device_name(device)
    if dtype is not None:
        call["dtype"] = dtype_name(dtype)
    call.update(overrides)
    weights = _weights_of(name)
    sources = (SHIPPED_DEFAULTS.get(key, {}) if isinstance(key, str) else {}, config_values,
               weights, call)
    tree, given = {}, set()
    for values in sources:
        if values is weights and weights.get("ckpt"):
            given.discard("init_seed")  # a config's --init seed: unused once weights are named
        tree = merge(tree, check_tree(tree_of(values), "keywords", flags=True))
        given |= set(values)
    if not given & {"model", "ckpt"}:  # no default flavor behind None (the CLI's DiT-XL/2)
        raise ConfigError(f"from_pretrained({name!r}) names no model: pass a checkpoint file, a "
                          f"shipped model ({', '.join(SHIPPED)}) or a flavor (e.g. 'debug', "
                          "'DiT-XL/2' with init='random'), or model=... / a config naming one")
    return settings_of(tree, explicit=given)


_FLAG = re.compile(r"--([a-z0-9][a-z0-9-]*)")


def keyword_message(text: str) -> str:
    """A ConfigError line with the CLI's ``--flag-name`` written as the keyword ``flag_name``."""
    def sub(m):
        name = m.group(1).replace("-", "_")
        return name if name in NAMES else m.group(0)

    return _FLAG.sub(sub, text)
