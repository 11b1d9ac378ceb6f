"""One pipeline call's arguments: checked, agreed on by every rank, and turned into each sample's
initial conditions.

Owns ``CallArgs`` (the normalised arguments), ``check_call`` (one ``ConfigError`` line per bad
argument), ``agree`` (the collective argument check), ``conditions`` (noise, label and generator of
the positions a rank samples) and ``replay`` (keeps user generators in step on every rank).

Bounds (each refused in one line naming the argument, before anything runs):

- ``guidance_scale`` in [1, ``GUIDANCE_MAX`` = 1e4] (the tree's ``cfg_scale`` bound,
  dice_ds/ds_config.py): useful scales are 1-20 (DiT samples at 1.5 and 4.0); 1e4 keeps the guided
  prediction ``uncond + s·(cond − uncond)`` finite in fp32/bf16 for any finite forward (|cond −
  uncond| up to 3e34), where 1e300 overflows to inf on the first step (NaN images);
- ``latents``: floating point (complex, bool and integer tensors are refused, not cast), finite,
  |x| <= ``LATENTS_MAX`` = 1e4: the initial noise is N(0, 1) (a draw beyond 10 has probability
  1e-23), so 1e4 is a thousand standard deviations, and keeps the first forward far from fp32
  overflow (1e38 overflows in the patch embedding);
- ``num_inference_steps`` in [1, ``MAX_STEPS[sampler]``] (1000 for DDPM/DDIM, 10000 for RF;
  the reasons: dice_ds/ds_config.py);
- integers (steps, seed, batch_size, first_index, local_limit, class ids) may be Python or numpy
  integers, guidance a Python or numpy real; ``seed`` and ``generator`` are exclusive (a generator
  decides every draw, so a seed given with it would be silently ignored).

Where a sample's randomness comes from (position j of the call, index = first_index + j):

- ``generator`` (a list of B CPU generators, or one, which is split into B by drawing B seeds from
  it): generator j draws, in this order, a label (``randint(num_classes)``; used when class_labels
  is None), the initial noise (used when latents is None), then (DDPM) each step's noise;
- otherwise ``seed`` (default: the config's global seed): the same, from a fresh generator seeded
  ``sample_seed(seed, index)``, which is exactly ``dice-ds sample``'s sample ``index``
  (``dice_ds.diffusion.draw_conditions``); with class_labels or latents given, the draws they
  replace are still made, so the other draws stay the CLI's.

Invariants: every rank draws the same numbers for a position, whichever rank samples it, so a
position's noise and label do not depend on the world size (its image, in DP and sync EP, only up
to float rounding: a rank's batch is about B/W, and kernels round differently at other batch
sizes; ``dice-ds sample`` keeps n per rank fixed and is bitwise equal); user generators end a call
in the same state
on every rank (every rank draws each one's label and noise, and ``replay`` makes the DDPM draws of
the samples another rank computed). Filler positions (j >= B, see ``DiTMoEPipeline``) draw by the
seed rule and are never returned.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np
import torch

from dice_ds.config import ConfigError
from dice_ds.diffusion import draw_from, sample_generators
from dice_ds.ds_config import CFG_SCALE_MAX, MAX_STEPS
from dice_ds.options import steps_of

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
OUTPUT_RANKS = ("rank0", "all", "local")
_SEED_MAX = 2**63 - 1
GUIDANCE_MAX = CFG_SCALE_MAX
"""The largest ``guidance_scale`` (module docstring; the settings tree's ``cfg_scale`` bound)."""
LATENTS_MAX = 1e4
"""The largest |value| of ``latents`` (module docstring)."""


@dataclass
class CallArgs:
    """A call's arguments after ``check_call`` (tensors on the CPU)."""

    batch_size: int
    labels: torch.Tensor | None
    """int64 [B], or None: each sample's generator draws its label."""
    steps: int
    guidance: float
    seed: int
    first_index: int
    latents: torch.Tensor | None
    """fp32 [B, C, s, s] initial noise, or None."""
    generators: list | None
    """Per-sample generators (the user's list, or split from one generator), or None (seed rule)."""
    generator_kind: str | None
    output_type: str
    output_ranks: str
    drawn: tuple | None = None
    """(z [B, C, s, s], y [B]) drawn from ``generators`` at the start of the call."""
    step_callback: tuple = (None, ())
    """(``callback_on_step_end``, its tensor inputs): run on rank 0 (``dice_ds.pipeline.core``)."""

    def summary(self) -> dict:
        """What every rank must agree on (``agree``), in a form cheap to gather and to print."""
        return {
            "batch_size": self.batch_size,
            "class_labels": None if self.labels is None else _show_list(self.labels.tolist()),
            "num_inference_steps": self.steps, "guidance_scale": self.guidance, "seed": self.seed,
            "first_index": self.first_index, "output_type": self.output_type,
            "output_ranks": self.output_ranks,
            "callback_on_step_end": self.step_callback[0] is not None,  # its stop is collective
            "latents": None if self.latents is None else
            f"{list(self.latents.shape)} sha256 {_digest(self.latents.numpy().tobytes())}",
            "generator": None if self.generators is None else
            f"{self.generator_kind} sha256 {_digest(b''.join(_state(g) for g in self.generators))}",
        }


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _state(g: torch.Generator) -> bytes:
    return g.get_state().numpy().tobytes()


def _show_list(values: list) -> str:
    if len(values) <= 8:
        return str(values)
    return f"{len(values)} labels sha256 {_digest(repr(values).encode())}"


def _is_int(value) -> bool:
    """A Python or numpy integer (bools of either kind are not integers here)."""
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_))


def _int(name: str, value, low: int, high: int = _SEED_MAX) -> int:
    if not _is_int(value):
        raise ConfigError(f"{name}={value!r}: must be an integer")
    value = operator.index(value)
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} must be in [{low}, {high}]")
    return value


def _labels(class_labels, num_classes: int) -> torch.Tensor | None:
    if class_labels is None:
        return None
    if _is_int(class_labels):
        class_labels = [operator.index(class_labels)]
    try:
        t = torch.as_tensor(class_labels)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"class_labels={class_labels!r}: pass a list of class ids") from None
    if t.dim() != 1 or t.numel() == 0 or t.dtype in (torch.bool,) or t.is_floating_point() \
            or t.is_complex():
        raise ConfigError(f"class_labels: pass a non-empty list of integer class ids (got "
                          f"{t.dtype} of shape {list(t.shape)})")
    t = t.to("cpu", torch.int64)
    bad = [int(v) for v in t if not 0 <= int(v) < num_classes]
    if bad:
        raise ConfigError(f"class_labels: {bad[0]} is not a class of this model (0..{num_classes - 1})")
    return t


def _generators(generator) -> tuple[list | None, str | None]:
    if generator is None:
        return None, None
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise ConfigError("generator: pass a torch.Generator or a list of them")
    if any(g.device.type != "cpu" for g in gens):
        raise ConfigError("generator: pass CPU generators (noise is drawn on the CPU so that it "
                          "is the same on every device)")
    return gens, "list" if isinstance(generator, (list, tuple)) else "single"


def _batch_size(labels, batch_size, latents, gens, kind) -> int:
    sizes = {"class_labels": None if labels is None else len(labels),
             "batch_size": batch_size,
             "latents": None if latents is None else int(latents.shape[0]),
             "generator": len(gens) if kind == "list" else None}
    given = {k: v for k, v in sizes.items() if v is not None}
    if not given:
        raise ConfigError("class_labels=None needs batch_size=N (the labels are then drawn per "
                          "sample, as dice-ds sample draws them), or pass class_labels")
    if len(set(given.values())) > 1:
        raise ConfigError("the batch size differs between "
                          + ", ".join(f"{k} ({v})" for k, v in given.items())
                          + ": give class_labels, latents and generator lists of one length "
                          "(or a single generator)")
    return _int("batch_size", next(iter(given.values())), 1)


def _latents(latents, channels: int, side: int) -> torch.Tensor | None:
    if latents is None:
        return None
    try:
        t = torch.as_tensor(latents).detach()
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"latents: a {type(latents).__name__} is not a tensor; pass a float "
                          f"tensor or array [B, {channels}, {side}, {side}]") from None
    if not t.is_floating_point():  # complex, bool, integers: refused rather than cast
        raise ConfigError(f"latents: dtype {str(t.dtype).removeprefix('torch.')}; pass "
                          "floating-point noise (float32, bfloat16, float16 or float64)")
    t = t.to("cpu", torch.float32)
    if t.dim() != 4 or tuple(t.shape[1:]) != (channels, side, side):
        raise ConfigError(f"latents: shape {list(t.shape)}, expected [B, {channels}, {side}, {side}]")
    if not torch.isfinite(t).all():
        raise ConfigError("latents: must be finite (no NaN or inf)")
    if t.numel() and float(t.abs().max()) > LATENTS_MAX:
        raise ConfigError(f"latents: |value| up to {float(t.abs().max()):g}, must be <= "
                          f"{LATENTS_MAX:g} (initial noise is N(0, 1); larger values overflow)")
    return t.contiguous()


def _guidance(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating,
                                                                     np.integer)):
        raise ConfigError(f"guidance_scale={value!r}: must be a finite number")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"guidance_scale={value!r}: must be a finite number")
    if value < 1:
        raise ConfigError(f"guidance_scale={value} must be >= 1 (1 disables guidance)")
    if value > GUIDANCE_MAX:
        raise ConfigError(f"guidance_scale={value:g} must be <= {GUIDANCE_MAX:g} (useful scales "
                          "are 1-20; larger ones overflow the guided prediction)")
    return value


def _steps(value, sampler: str) -> int:
    return _int("num_inference_steps", value, 1, MAX_STEPS[sampler])


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name}={value!r}: must be True or False")
    return bool(value)


def check_local(return_dict, reset_stats, local_limit, output_ranks: str) -> int | None:
    """The call's rank-local keywords (they may differ between ranks: the CLI's ``local_limit``);
    one ConfigError line naming the argument."""
    _flag("return_dict", return_dict)
    _flag("reset_stats", reset_stats)
    if local_limit is None:
        return None
    if output_ranks != "local" or not _is_int(local_limit) or local_limit < 0:
        raise ConfigError(f"local_limit={local_limit!r}: only with output_ranks='local', and an "
                          "integer >= 0 (this rank's first N positions)")
    return operator.index(local_limit)


def check_call(pipe, class_labels, batch_size, num_inference_steps, guidance_scale, generator,
               seed, latents, first_index, output_type, output_ranks) -> CallArgs:
    """The normalised arguments (``pipe``'s defaults filled in); raises one ConfigError line."""
    opts, cfg = pipe.spec.opts, pipe.spec.model_cfg
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type={output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
    if output_type != "latent" and pipe.decoder is None:
        raise ConfigError(f"output_type={output_type!r} needs a decoder, and this pipeline has "
                          "vae='none': use output_type='latent', or build it with vae='identity' "
                          "(pixel-space models) or vae='sd' and vae_path=DIR")
    if not isinstance(output_ranks, str) or output_ranks not in OUTPUT_RANKS:
        raise ConfigError(f"output_ranks={output_ranks!r}: use one of {', '.join(OUTPUT_RANKS)}")
    if seed is not None and generator is not None:
        raise ConfigError("seed and generator both decide the draws: pass one of them (a "
                          "generator's draws do not depend on seed)")
    if batch_size is not None:
        batch_size = _int("batch_size", batch_size, 1)
    labels = _labels(class_labels, cfg.num_classes)
    z = _latents(latents, cfg.in_channels, cfg.input_size)
    gens, kind = _generators(generator)
    b = _batch_size(labels, batch_size, z, gens, kind)
    if kind == "single":  # split: B seeds from the one generator, the same on every rank
        seeds = torch.randint(0, _SEED_MAX, (b,), generator=gens[0])
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    call = CallArgs(
        batch_size=b, labels=labels,
        steps=_steps(steps_of(opts) if num_inference_steps is None else num_inference_steps,
                     pipe.sampler_name),
        guidance=_guidance(opts.cfg_scale if guidance_scale is None else guidance_scale),
        seed=_int("seed", opts.global_seed if seed is None else seed, 0),
        first_index=_int("first_index", first_index, 0), latents=z, generators=gens,
        generator_kind=kind, output_type=output_type, output_ranks=output_ranks)
    return call


def draw_generators(call: CallArgs, channels: int, side: int, num_classes: int) -> None:
    """Every rank draws every generator's label and noise (their states stay equal on all ranks)."""
    if call.generators is not None:
        call.drawn = draw_from(call.generators, channels, side, num_classes)


def agree(summary: dict | None, error: str | None, world: int) -> None:
    """Collective: every rank must have the same ``summary``; any rank's error ends every rank.

    Raises one ConfigError line on every rank: this rank's own error, another rank's error, or
    the first argument on which a rank differs from rank 0."""
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, (summary, error))
        failed = [(r, e) for r, (_, e) in enumerate(gathered) if e]
        if failed and not error:
            error = f"rank {failed[0][0]} rejected the call's arguments: {failed[0][1]}"
        if not error:
            error = _disagreement(gathered[0][0], gathered)
    if error:
        raise ConfigError(error)


def _disagreement(ref: dict, gathered: list) -> str | None:
    for r, (summary, _) in enumerate(gathered):
        for key, value in summary.items():
            if value != ref.get(key):
                return (f"DiTMoEPipeline call: rank {r} has {key}={value} but rank 0 has "
                        f"{key}={ref.get(key)}: the call is collective, every rank must pass the "
                        "same arguments")
    return None


def conditions(call: CallArgs, positions: list[int], channels: int, side: int, num_classes: int):
    """(z [n, C, s, s], y [n], generators) of ``positions`` (module docstring)."""
    zs, ys, gens = [], [], []
    for j in positions:
        real = j < call.batch_size
        if real and call.generators is not None:
            g, z, y = call.generators[j], call.drawn[0][j], call.drawn[1][j]
        else:
            g = sample_generators(call.seed, [call.first_index + j])[0]
            z, y = draw_from([g], channels, side, num_classes)
            z, y = z[0], y[0]
        if real and call.latents is not None:
            z = call.latents[j]
        if real and call.labels is not None:
            y = call.labels[j]
        zs.append(z)
        ys.append(y)
        gens.append(g)
    return torch.stack(zs), torch.stack(ys), gens


def replay(call: CallArgs, computed: set[int], noise_draws: int, shape: tuple) -> None:
    """Make the per-step noise draws of the user's generators this rank did not sample with."""
    if call.generator_kind != "list" or not noise_draws:
        return
    for j, g in enumerate(call.generators):
        if j not in computed:
            for _ in range(noise_draws):
                torch.randn(shape, generator=g)
