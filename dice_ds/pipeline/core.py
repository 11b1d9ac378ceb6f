"""``DiTMoEPipeline``: a DiT-MoE with its parallel runtime, called like diffusers' ``DiTPipeline``.

Owns the pipeline object (built once: process groups, model, runtime, decoder) and its call (the
global batch spread over the ranks, sampled, decoded where it was sampled, delivered to the output
ranks). What a call's arguments mean and where its randomness comes from: ``dice_ds.pipeline.call``;
the output types: ``dice_ds.pipeline.output``; which rank samples and owns which position:
``dice_ds.parallel.sp_batches``. Which ranks form each group is chosen once at build, on the hosts
the ranks run on (``dice_ds.parallel.topology``; rank 0 prints it, run.json records it).

A call builds its step rule once (the flavor's sampler, or the user's diffusers scheduler:
``DiffusersWords.step_rule``) and its schedule of as many steps as the rule has timesteps
(``dice_ds.schedule.Schedule``), and runs every sub-batch through the denoising loop
(``dice_ds.pipeline.denoise``) with that schedule handed to the runtime.

A step that produces NaN/inf stops the call with one ``NonFiniteOutputError`` line on every rank
(``dice_ds.pipeline.denoise``: a rank that exchanges nothing stops at the step, an EP/SP group runs
its sub-batches to the end; then one all-reduce of a flag per call, over the world, makes every
rank raise the same line, naming the rank that found it); nothing of the batch is returned, so
``dice-ds sample`` writes nothing of it.

Invariants: every ConfigError of the settings is raised before a process group starts; the model
and the runtime are built once and reused by every call (each sub-batch is one
``runtime.batch(schedule)``, which resets at entry and finishes, or on an exception aborts, every
exchange at exit, so nothing stale or in flight crosses sub-batches or calls); a call is
collective (every rank calls it with the same arguments, checked by one all-gather); torch's
global RNG is never used or seeded.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

from dice_ds import mcore
from dice_ds.config import ConfigError
from dice_ds.diffusion import noise_draws
from dice_ds.options import mode_name, sampler_of
from dice_ds.parallel.groups import build_groups
from dice_ds.parallel.sp_batches import call_sub_batches
from dice_ds.parallel.topology import place_ranks
from dice_ds.pipeline.build import build_model_and_runtime, time_first_step
from dice_ds.pipeline.call import (
    OUTPUT_RANKS,
    agree,
    check_call,
    check_local,
    conditions,
    draw_generators,
    replay,
)
from dice_ds.pipeline.denoise import FiniteCheck, LoopPosition, NonFiniteOutputError, denoise
from dice_ds.pipeline.diffusers_api import DiffusersWords, StepEnd, check_callback
from dice_ds.pipeline.output import (
    DiTMoEPipelineOutput,
    deliver,
    encode,
    exchange_totals,
    finish,
    rank_exchange,
)
from dice_ds.pipeline.prepare import (
    PipelineSpec,
    connect,
    default_world_size,
    keyword_message,
    pipeline_options,
    prepare_spec,
)
from dice_ds.runenv import quieter_third_party
from dice_ds.schedule import Schedule
from dice_ds.vae import build_decoder


class DiTMoEPipeline(DiffusersWords):
    """Class-conditional sampling of a DiT-MoE on one process or W ranks (DP, EP/DICE, SP).

    Build it with ``DiTMoEPipeline.from_pretrained(weights, config=None, device=None, dtype=None,
    **overrides)`` (``weights``: a checkpoint file, ``"digits"`` for the shipped model, or a flavor
    name with ``init="random"``; ``config``: a ds_config path or dict as ``dice-ds sample --config``
    takes; ``overrides``: the settings' keyword names, e.g. ``ep=True, ep_async=True``) or
    ``DiTMoEPipeline(run_options)``. It starts the default process group from the launcher's
    environment (torchrun, deepspeed, slurm: WORLD_SIZE/RANK/MASTER_ADDR), or uses one already
    initialised, or runs alone. ``output_ranks``: which ranks receive the images: ``"rank0"``
    (default; the others get ``images=None``), ``"all"``, or ``"local"`` (each rank its own
    positions, no gathering; ``dice-ds sample`` uses it); a call may override it.

    A call: ``pipe(class_labels, num_inference_steps=None, guidance_scale=None, generator=None,
    seed=None, latents=None, output_type="pil", return_dict=True)``. Under W ranks it is
    collective: every rank calls it with the same arguments (checked: one line on every rank if
    they differ). Position j of the batch of B = len(class_labels) belongs to rank j % W (the index
    formula of ``dice-ds sample``: a position gets the same noise and label at any world size,
    and in DP and sync EP the same image up to float rounding, as a rank's batch is about B/W); an
    SP group samples its members' positions together; with EP, B is padded to a multiple of W
    with filler samples (computed, never returned) so that every rank sends tokens.

    diffusers' other words (``scheduler``, ``labels``/``id2label``/``get_label_ids``,
    ``torch_dtype``, ``.to()``/``.device``/``.dtype``, the progress bar, ``callback_on_step_end``):
    ``dice_ds.pipeline.diffusers_api``.

    Differences from diffusers' ``DiTPipeline`` (same names, same meaning otherwise):

    - construction: a dice_ds checkpoint / shipped model / flavor plus a ds_config and overrides,
      not a diffusers repository; on W > 1 ranks the device, dtype and parallel mode are fixed at
      construction (``.to()`` elsewhere is refused in one line); images go to rank 0 only unless
      ``output_ranks="all"``;
    - ``class_labels``: class ids (``get_label_ids`` turns words into them); ``None`` with
      ``batch_size=B`` draws the labels per sample as ``dice-ds sample`` does;
    - ``guidance_scale``: default the config's ``cfg_scale`` (1.5), not 4.0; must be >= 1, and 1
      runs the plain conditional forward; RF guides all latent channels, DDPM/DDIM the first 3
      (DiT's legacy rule, ``dice_ds.diffusion``); both branches are evaluated on the conditional
      state, as in diffusers and DiT (only the first half of the doubled batch is fed to the model);
    - ``num_inference_steps``: default the config's (``num_sampling_steps``; 50 RF, 250 DDPM/DDIM);
    - ``generator``: CPU generators; a list gives each sample its own stream (label, noise, DDPM
      noise), a single one is split into B per-sample generators; ``seed`` (extra; default the
      config's ``global_seed``) reproduces ``dice-ds sample``'s sample ``first_index + j`` for
      position j (``first_index`` extra, default 0) when no generator is given;
    - ``latents``: optional initial noise [B, C, h, w] (extra);
    - ``output_type``: also ``"latent"``; ``"pil"`` pixels use the reference formula
      (clamp(127.5·x + 128) truncated: the bytes ``dice-ds sample`` writes) rather than
      round(255·x); ``"np"``/``"pt"`` keep the decoder's channels (1 for the pixel-space digits
      model, whose "latents" are the images in [-1, 1]);
    - the output also carries ``stats`` (mode, world_size, sampler: 'rf'/'ddpm'/'ddim' or the
      scheduler's class name, num_images, num_inference_steps, guidance_scale, ``seconds``:
      sampler time, max over ranks;
      ``sub_batch_seconds``: this rank's, ``sub_batch_cpu_seconds`` its process's CPU seconds
      (all threads); ``bytes_exchanged`` (sum over ranks) and
      ``cache_peak_bytes`` (max) as in run.json, over every rank except with
      ``output_ranks='local'`` (this rank's); ``runtime``: this rank's ``runtime.stats()``) and
      ``indices``; keywords ``batch_size``, ``first_index``, ``output_ranks``, ``reset_stats``
      (False: the runtime's counters accumulate across calls, as run.json reports a whole run) and
      ``local_limit`` (with ``output_ranks='local'`` only: this rank keeps, decodes and returns
      only its first N positions; the others are still sampled: ``dice-ds sample`` writes no file
      past ``--num-fid-samples`` and, with ``--trim-samples``, one per batch).
    """

    def __init__(self, options, *, output_ranks: str = "rank0", world_size: int | None = None):
        """``options``: ``Settings`` (validated here) or a ``PipelineSpec`` already prepared."""
        if output_ranks not in OUTPUT_RANKS:
            raise ConfigError(f"output_ranks={output_ranks!r}: use one of {', '.join(OUTPUT_RANKS)}")
        if isinstance(options, PipelineSpec):
            spec = options
        else:
            try:
                spec = prepare_spec(options, world_size or default_world_size())
            except ConfigError as e:
                raise ConfigError(keyword_message(str(e))) from None
        self.spec, self.output_ranks = spec, output_ranks
        self.startup = spec.startup
        self.rank, self.world_size = connect(spec)  # reused when initialised (the CLI's order)
        self._build()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, config=None, device=None,
                        dtype=None, *, output_ranks: str = "rank0", world_size: int | None = None,
                        **overrides) -> "DiTMoEPipeline":
        """A pipeline from weights, a ds_config and settings keyword overrides (class docstring)."""
        try:
            opts = pipeline_options(pretrained_model_name_or_path, config, device, dtype,
                                    **overrides)
        except ConfigError as e:
            raise ConfigError(keyword_message(str(e))) from None
        return cls(opts, output_ranks=output_ranks, world_size=world_size)

    def _rebuild(self, opts) -> None:
        """The one-process pipeline again from ``opts`` (``to()``: another device or dtype)."""
        try:
            spec = prepare_spec(opts, 1)
        except ConfigError as e:
            raise ConfigError(keyword_message(str(e))) from None
        self.spec, self.startup = spec, spec.startup
        self.rank, self.world_size = connect(spec)
        self._build()

    def _build(self) -> None:
        spec, opts = self.spec, self.spec.opts
        with quieter_third_party(opts.verbose):  # megatron's import-time fallback notes
            mcore.prepare(spec.device)  # version check; CPU patches (patches/megatron_cpu.py)
            with self.startup.phase("process_groups"):  # every group of the run, once
                # the rank layout on the hosts the ranks run on (dice_ds/parallel/topology.py)
                self.placement = place_ranks(self.world_size, spec.plan.ep_size,
                                             spec.plan.sp_size, opts.rank_layout)
                self.groups = build_groups(self.placement.dims)
            if self.rank == 0 and self.world_size > 1:
                print(self.placement.line(), file=sys.stderr, flush=True)
            self.model, self.runtime = build_model_and_runtime(spec, self.groups)
        time_first_step(self.model, self.startup)
        self.decoder = build_decoder(opts.vae, opts.vae_path, spec.device,
                                     spec.model_cfg.in_channels)
        self.sampler_name = sampler_of(opts)
        self.position = LoopPosition()
        """The step the denoising loop is in (what a rank reports when a collective fails)."""
        self.finite_check = FiniteCheck(stop=not self._exchanges_every_step())

    def _exchanges_every_step(self) -> bool:
        """Whether this rank's loop exchanges with other ranks at every step (EP, SP): then it
        cannot stop alone at a non-finite step (``dice_ds.pipeline.denoise``)."""
        plan = self.spec.plan
        return self.world_size > 1 and (plan.ep_size > 1 or plan.sp_enabled)

    # -- the call ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, class_labels=None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator=None, seed: int | None = None,
                 latents=None, output_type: str = "pil", return_dict: bool = True, *,
                 batch_size: int | None = None, first_index: int = 0,
                 output_ranks: str | None = None, reset_stats: bool = True,
                 local_limit: int | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None):
        """Sample B images (class docstring); collective under W ranks."""
        self._interrupt = False
        call, local_limit = self._agreed_call(
            (return_dict, reset_stats, local_limit), class_labels, batch_size,
            num_inference_steps, guidance_scale, generator, seed, latents, first_index,
            output_type, self.output_ranks if output_ranks is None else output_ranks,
            (callback_on_step_end, callback_on_step_end_tensor_inputs))
        if reset_stats and self.runtime is not None:
            self.runtime.reset_stats()
        failure = None
        with quieter_third_party(self.spec.opts.verbose):
            try:
                positions, x, seconds, cpu, sampler = self._sample(call)
                if local_limit is not None and positions:
                    positions, x = positions[:local_limit], x[:local_limit]
                rows = encode(x, call.output_type, self.decoder) if positions else None
            except NonFiniteOutputError as e:
                failure = e
        self._agree_finite(failure)
        stats = self._stats(call, seconds, cpu, sampler)
        got = deliver(positions, rows, call.output_ranks, self.rank, self.world_size,
                      call.batch_size)
        images, indices = (finish(got[0], call.output_type), got[1]) if got else (None, None)
        if not return_dict:
            return (images,)
        return DiTMoEPipelineOutput(images=images, stats=stats, indices=indices)

    def _agreed_call(self, local: tuple, *args):
        """Check the arguments here, then agree on them with every rank (one all-gather); returns
        the call and this rank's ``local_limit`` (``local``: the rank-local keywords; the last
        of ``args``: the step callback and its tensor inputs)."""
        limit = None
        *args, (callback, tensor_inputs) = args
        try:
            call = check_call(self, *args)
            limit = check_local(*local, call.output_ranks)
            call.step_callback = (callback, check_callback(callback, tensor_inputs))
            summary, error = call.summary(), None
        except ConfigError as e:
            call, summary, error = None, None, str(e)
        agree(summary, error, self.world_size)
        cfg = self.spec.model_cfg
        draw_generators(call, cfg.in_channels, cfg.input_size, cfg.num_classes)
        return call, limit

    def _agree_finite(self, failure: NonFiniteOutputError | None) -> None:
        """Every rank raises the same ``NonFiniteOutputError`` line if any rank's batch was
        non-finite: one all-reduce of a flag per call (W > 1), then, only on failure, an
        all-gather of the lines (the lowest rank that found it names itself)."""
        if self.world_size == 1:
            if failure is not None:
                raise failure
            return
        device = "cuda" if self.spec.device == "cuda" else "cpu"
        flag = torch.tensor([int(failure is not None)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return
        lines: list = [None] * self.world_size
        dist.all_gather_object(lines, None if failure is None else str(failure))
        rank, text = next((r, text) for r, text in enumerate(lines) if text)
        raise NonFiniteOutputError(f"rank {rank}: {text}")

    def _padded(self, batch_size: int) -> int:
        """With EP every rank must sample: B rounded up to a multiple of W (filler positions)."""
        if self.spec.plan.ep_size > 1:
            return math.ceil(batch_size / self.world_size) * self.world_size
        return batch_size

    def _sample(self, call):
        """This rank's sub-batches: (its own positions < B, their sampled rows, seconds per
        sub-batch, this process's CPU seconds per sub-batch: every thread, gloo's too)."""
        cfg, device = self.spec.model_cfg, self.spec.device
        rule = self.step_rule(call.steps)  # the scheduler's steps: S = its timesteps' count
        schedule = Schedule.build(self.spec.plan, rule.num_steps, cfg.depth)  # one per call
        own, rows, seconds, cpu, computed = [], [], [], [], set()
        self.finite_check.failure = None  # a group's first non-finite step, raised after the loop
        padded = self._padded(call.batch_size)
        dims = self.groups.dims  # the run's sizes and rank layout (its SP groups)
        subs = call_sub_batches(self.spec.plan, dims, padded, self.rank)
        ticks = max(len(call_sub_batches(self.spec.plan, dims, padded, r))
                    for r in range(self.world_size)) * rule.num_steps
        end = StepEnd(self, *call.step_callback, self.rank, ticks, len(subs) * rule.num_steps,
                      self.world_size > 1, device)
        for positions, mine in subs:
            z, y, gens = conditions(call, positions, cfg.in_channels, cfg.input_size,
                                    cfg.num_classes)
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            x = z.to(device) if end.stopped else denoise(
                rule, self.model, z.to(device), y.to(device), call.guidance,
                runtime=self.runtime, schedule=schedule, generators=gens,
                position=self.position, check=self.finite_check,
                what=f"the latents of {len(positions)} samples from index "
                     f"{call.first_index + positions[0]}", on_step_end=end)
            _sync(device)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            computed.update(positions)
            kept = [j for j in positions[mine] if j < call.batch_size]  # fillers come last
            own += kept
            rows.append(x[mine][:len(kept)])
        end.finish()
        if self.finite_check.failure is not None:
            raise self.finite_check.failure
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        replay(call, computed, noise_draws(rule), shape)
        return own, (torch.cat(rows) if own else None), seconds, cpu, rule.name

    def _stats(self, call, seconds: list[float], cpu: list[float], sampler: str) -> dict:
        """The call's measurements (class docstring); collective unless ``local`` or W = 1."""
        rt = self.runtime.stats() if self.runtime is not None else None
        mine = (sum(seconds), *rank_exchange(rt))
        parts = [mine]
        if call.output_ranks != "local" and self.world_size > 1:
            parts = [None] * self.world_size
            dist.all_gather_object(parts, mine)
        return {"mode": mode_name(self.spec.plan), "world_size": self.world_size,
                "sampler": sampler, "num_images": call.batch_size,
                "num_inference_steps": call.steps, "guidance_scale": call.guidance,
                "seconds": max(p[0] for p in parts), "sub_batch_seconds": seconds,
                "sub_batch_cpu_seconds": cpu,
                **exchange_totals([(b, c) for _, b, c in parts]), "runtime": rt}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
