"""``python -m dice_ds.sample`` / ``dice-ds sample``: data- or expert-parallel sampling of a DiT-MoE.

Owns the run: options -> ``prepare`` (checkpoint read, model config, parallel plan; every ConfigError
is raised here, before any process group starts) -> ``run`` (process groups, model, optional EP
runtime, the batch loop, outputs, ``run.json``).

Launch with ``torchrun --nproc_per_node W -m dice_ds.sample ...``, the deepspeed launcher
(``deepspeed --num_gpus W --module dice_ds.sample ...``; its ``--local_rank=N`` is accepted), slurm
(``srun`` with MASTER_ADDR/MASTER_PORT set), or plain ``python`` (one rank). Backend: gloo on CPU,
NCCL on CUDA.

Invariants:
- Sample index j's noise and label come from a generator seeded by (global seed, j) (see
  ``dice_ds.diffusion``), and ranks take indices by the reference's formula (``dice_ds.outputs``), so
  any world size writes the same image for every index, and a resumed run equals an uninterrupted one.
  The global torch RNG is still seeded DiT-style with ``global_seed·W + rank``; no draw uses it.
- Every rank runs the same batches (EP ranks exchange tokens each step): a batch is skipped on resume
  only when its files exist on every rank (one all-reduce before the loop).
- A failing rank prints its traceback with its rank and exits at once with ``os._exit(1)``; the
  launcher (torchrun, deepspeed) then stops the other ranks instead of leaving them in a collective.
  Every collective has the run's timeout (``--pg-timeout``, ``dice_ds.parallel.groups``): a rank
  whose peer died or stopped prints one line naming itself, the step and the batch
  (``dice_ds.runenv.PeerFailure``) and exits 1 within that time, under any launcher.
- ``sampling_seconds`` times the sampler loops only (VAE decoding and file writes excluded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass

from dice_ds.config import ConfigError, ModelConfig, get_flavor
from dice_ds.startup import StartupLog, memory_now, seconds_since_process_start
from dice_ds.options import (
    RunOptions,
    auto_sample_dir,
    build_plan,
    env_rank,
    env_world_size,
    image_size_of,
    latent_side,
    mode_name,
    parse_options,
    sampler_of,
    steps_of,
    validate_options,
)



@dataclass
class Prepared:
    """Everything decided before the process group starts."""

    opts: RunOptions
    model_cfg: ModelConfig
    plan: object
    world_size: int
    device: str
    sample_dir: str
    checkpoint: object | None
    """A streaming reader of ``--ckpt`` (``dice_ds.weights.read``), or None (random weights)."""
    parallelize: object | None
    """``dice_ds.parallel.apply.parallelize_dit_moe`` (None only if that module is absent)."""
    startup: object = None
    """This rank's ``dice_ds.startup.StartupLog`` (phases, bytes read, memory; run.json)."""


def _resolve_device(opts: RunOptions) -> str:
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    if opts.tf32 and opts.device is None and not torch.cuda.is_available():
        raise ConfigError("--tf32 only affects CUDA matmuls and no CUDA device is available")
    return opts.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _model_config(opts: RunOptions) -> tuple[ModelConfig, object | None]:
    flavor = get_flavor(opts.model)
    if opts.depth is not None:  # a reduced-depth variant: full width, fewer blocks
        flavor = flavor.replace(depth=opts.depth)
    side = latent_side(opts)
    if opts.ckpt is None:
        cfg = flavor.replace(num_experts=opts.num_experts or flavor.num_experts)
        return cfg.replace(input_size=side).validate(), None
    from dice_ds.checkpoint import config_for_checkpoint
    from dice_ds.preflight import check_complete, read_checkpoint

    reader = read_checkpoint(opts.ckpt)  # any unreadable file: one ConfigError line
    shapes = reader.meta_state_dict()  # names, dtypes, shapes: no tensor is read yet
    cfg = config_for_checkpoint(flavor, shapes, num_experts=opts.num_experts)
    check_complete(shapes, cfg, opts.ckpt)  # missing keys: before the process group, not at load
    # another image size than the flavor's: load_into_model regenerates pos_embed and warns
    return cfg.replace(input_size=side).validate(), reader


def _parallelize_fn(plan):
    """``parallelize_dit_moe``: every plan goes through it (DP included: it then only measures)."""
    try:
        from dice_ds.parallel.apply import parallelize_dit_moe
    except ImportError as e:
        if plan.ep_enabled:
            raise ConfigError(f"--ep: expert parallelism is not available in this build ({e}); "
                              "run without --ep (data parallel)") from None
        return None
    return parallelize_dit_moe


def prepare(opts: RunOptions, world_size: int | None = None) -> Prepared:
    """Resolve everything that can fail on bad input; raises ConfigError. Starts no process group.

    ``world_size``: the number of ranks the run will have (default: what the launcher announced in
    the environment; tests that start ranks themselves pass it).
    """
    from dice_ds.vae import check_decoder

    validate_options(opts)
    world = world_size or env_world_size()
    device = _resolve_device(opts)
    cfg, sd = _model_config(opts)
    if sampler_of(opts) == "ddpm" and not cfg.learn_sigma:
        raise ConfigError(f"--sampler ddpm needs a model with learned variance (learn_sigma); "
                          f"{cfg.name} has none: use --sampler ddim or rf")
    check_decoder(opts.vae, opts.vae_path, cfg.in_channels)
    plan = build_plan(opts, world_size=world, num_experts=cfg.num_experts, depth=cfg.depth)
    sample_dir = opts.sample_dir or auto_sample_dir(opts, plan, world)
    return Prepared(opts, cfg, plan, world, device, sample_dir, sd, _parallelize_fn(plan),
                    startup=StartupLog())


# ---------------------------------------------------------------------------------------------------
# the run (process groups exist from here on)
# ---------------------------------------------------------------------------------------------------


def _local_rank(opts: RunOptions) -> int:
    if opts.local_rank is not None:
        return opts.local_rank
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def _build(prep: Prepared, groups):
    """Model with weights, and the EP runtime (None for data parallelism)."""
    from dice_ds.models import DTYPES, build_model, init_weights

    opts, log = prep.opts, prep.startup
    log.facts["memory_before_build"] = memory_now()  # what build + load add is measured from here
    with log.phase("model_build"):  # meta device, then each parameter once on the device
        model = build_model(prep.model_cfg, groups, DTYPES[opts.dtype], prep.device)
    if prep.checkpoint is not None and os.environ.get("DICE_DS_READ_BASELINE") == "1":
        from dice_ds.weights.load import time_plain_read  # the I/O floor (docs/scale.md)

        log.facts["plain_read"] = time_plain_read(model, prep.checkpoint)
    with log.phase("weight_load"):
        if prep.checkpoint is not None:
            from dice_ds.checkpoint import load_into_model

            with prep.checkpoint as reader:  # this rank's tensors only, one at a time
                result = load_into_model(model, reader, progress=_progress_bars(opts))
            log.facts.update(bytes_read=result.bytes_read, checkpoint_reader=reader.kind,
                             dropped_expert_tensors=result.dropped_expert_keys)
            prep.checkpoint = None
        else:
            init_weights(model, opts.init, seed=opts.init_seed)
    log.facts["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = {}
    if prep.plan.sp_enabled:  # collective: the SP groups (dice_ds.parallel.sp)
        from dice_ds.parallel.groups import build_sp_group

        extra["sp_group"] = build_sp_group(prep.plan.ep_size, prep.plan.sp_size)
    runtime = prep.parallelize(model, prep.plan, groups, **extra) if prep.parallelize else None
    return model, runtime


def _progress_bars(opts: RunOptions) -> bool:
    """Progress bars on rank 0 of a terminal (the sample loop's ``Progress`` decides the same)."""
    return env_rank() == 0 and sys.stderr.isatty()


def _time_first_step(model, log) -> None:
    """Open the ``first_step`` phase at the model's first forward and close it after."""
    handles = []

    def pre(module, args):
        log.begin("first_step")

    def post(module, args, output):
        log.end("first_step")
        for h in handles:
            h.remove()

    handles += [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _todo_batches(out, prep: Prepared, rank: int, world: int) -> list[int]:
    """Batches that some rank still has to write (agreed by an all-reduce MIN over the world)."""
    import torch
    import torch.distributed as dist

    from dice_ds.outputs import batch_indices, num_batches

    opts = prep.opts
    n, total = opts.per_proc_batch_size, opts.num_fid_samples
    mine = [i for b in range(num_batches(total, world, n))
            for i in _written(batch_indices(b, rank, world, n), total, opts.trim_samples)]
    bad = out.bad_items(mine)
    if bad:
        print(f"dice-ds sample: rank {rank}: {len(bad)} empty or corrupt sample file(s) (e.g. "
              f"{out.item_path(bad[0])}): their batches run again", file=sys.stderr, flush=True)
    done = [out.has_all(_written(batch_indices(b, rank, world, n), total, opts.trim_samples))
            for b in range(num_batches(total, world, n))]
    flags = torch.tensor(done, dtype=torch.int32, device=prep.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [b for b, d in enumerate(flags.tolist()) if not d]


def _written(indices: list[int], total: int, trim: bool) -> list[int]:
    """The indices of a batch that get files: those < total; with --trim-samples only the first."""
    kept = [i for i in indices if i < total]
    return kept[:1] if trim else kept


def _batch_samples(b: int, total: int, world: int, n: int) -> int:
    """Samples (all ranks) of batch ``b`` that count: indices below the requested total."""
    return max(0, min((b + 1) * n * world, total) - b * n * world)


def _sub_batches(plan, todo: list[int], rank: int, world: int, n: int):
    """(batch, indices to sample, slice this rank writes, last of its batch?): one per batch, or
    with SP the SP group's samples (``dice_ds.parallel.sp_batches``)."""
    from dice_ds.parallel.sp_batches import sp_batches

    for b in todo:
        subs = sp_batches(plan, b, rank, world, n)
        for k, (indices, mine) in enumerate(subs):
            yield b, indices, mine, k == len(subs) - 1


def _sample_loop(prep: Prepared, model, runtime, decoder, out, rank: int, world: int) -> dict:
    """Run the batches still to do; returns this rank's timings.

    A collective that fails because a peer died or timed out becomes a ``PeerFailure`` naming this
    rank, the step and the batch.
    """
    from dice_ds.diffusion import draw_conditions, get_sampler
    from dice_ds.parallel.groups import group_timeout
    from dice_ds.runenv import Progress, StepTracker, is_peer_failure

    opts, cfg = prep.opts, prep.model_cfg
    sampler, steps = get_sampler(sampler_of(opts)), steps_of(opts)
    todo = _todo_batches(out, prep, rank, world)
    n, total = opts.per_proc_batch_size, opts.num_fid_samples
    progress = Progress(sum(_batch_samples(b, total, world, n) for b in todo), enabled=rank == 0)
    tracker = StepTracker(model, steps)
    seconds = []
    try:
        for b, indices, mine, last in _sub_batches(prep.plan, todo, rank, world, n):
            z, y, gens = draw_conditions(opts.global_seed, indices, cfg.in_channels,
                                         cfg.input_size, cfg.num_classes)
            _sync(prep.device)
            tracker.new_batch()
            t0 = time.perf_counter()
            try:
                x = sampler(model, z.to(prep.device), y.to(prep.device), steps, opts.cfg_scale,
                            runtime=runtime, generators=gens)
                _sync(prep.device)
            except Exception as e:
                if world > 1 and is_peer_failure(e):
                    raise tracker.failure(rank, b, e, group_timeout().total_seconds()) from e
                raise
            seconds.append(time.perf_counter() - t0)
            keep = _written(indices[mine], total, opts.trim_samples)
            x = x[mine][:len(keep)]  # the kept indices are a prefix of this rank's samples
            if decoder is None:
                out.write_latents(keep, x.cpu().numpy())
            elif keep:
                out.write_images(keep, decoder.decode(x))
            progress.update(_batch_samples(b, total, world, n) if last else 0)
    finally:
        progress.close()
        tracker.remove()
    return {"batch_seconds": seconds, "batches_run": len(todo),
            "samples_run": sum(_batch_samples(b, total, world, n) for b in todo)}


RUN_JSON_LEAD = ("mode", "model", "sampling_seconds", "images_per_second", "num_samples",
                 "samples_run", "world_size", "ep_size", "sampler", "num_steps", "cfg_scale",
                 "sample_dir", "dice_ds_version", "git_commit", "start_time", "host",
                 "checkpoint_sha256")
"""The keys ``run.json`` starts with (what a reader looks for first); the rest follow sorted."""


def _git_commit() -> str | None:
    """HEAD of the checkout dice_ds runs from, when it is one (None for an installed package)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        proc = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _fingerprint(prep: Prepared, ckpt_sha256: str | None, vae_sha256: str | None) -> dict:
    """What determines this run's images (``dice_ds.outputs`` docstring)."""
    from dice_ds.outputs import run_fingerprint

    opts, cfg, plan = prep.opts, prep.model_cfg, prep.plan
    settings = {
        "model": opts.model, "checkpoint_sha256": ckpt_sha256,
        "init": None if opts.ckpt else opts.init, "init_seed": None if opts.ckpt else opts.init_seed,
        "sampler": sampler_of(opts), "num_steps": steps_of(opts), "cfg_scale": opts.cfg_scale,
        "global_seed": opts.global_seed, "image_size": image_size_of(opts),
        "num_classes": cfg.num_classes, "num_experts": cfg.num_experts,
        "experts_impl": getattr(cfg, "experts_impl", None), "dtype": opts.dtype,
        "device": prep.device, "tf32": opts.tf32, "vae": opts.vae, "vae_sha256": vae_sha256,
        "mode": mode_name(plan), "payload_dtype": plan.payload_dtype,
    }
    if opts.depth is not None:  # only then: fingerprints of full-depth runs stay as they were
        settings["depth"] = cfg.depth
    return run_fingerprint(settings=settings, plan_fields=dataclasses.asdict(plan),
                           world_size=prep.world_size, per_proc_batch_size=opts.per_proc_batch_size)


def _claim_sample_dir(prep: Prepared, out, rank: int) -> dict:
    """Rank 0 hashes the weights, checks the directory's fingerprint (refuses a mix of runs, or
    moves the old samples aside with --force-new) and tells every rank; returns the fingerprint."""
    import torch.distributed as dist

    from dice_ds.outputs import dir_sha256, file_sha256

    opts = prep.opts
    result = [None]
    if rank == 0:
        try:
            with prep.startup.phase("checkpoint_hash"):  # streamed; cached by path/size/mtime
                ckpt_sha = file_sha256(opts.ckpt) if opts.ckpt else None
            fp = _fingerprint(prep, ckpt_sha,
                              dir_sha256(opts.vae_path) if opts.vae == "sd" else None)
            result = [{"fingerprint": fp, "moved": out.claim(fp, force_new=opts.force_new)}]
        except ConfigError as e:
            result = [{"error": str(e)}]
    dist.broadcast_object_list(result, src=0)
    if "error" in result[0]:
        raise ConfigError(result[0]["error"])
    out.create()
    if rank == 0 and result[0]["moved"]:
        print(f"dice-ds sample: --force-new: moved the samples of another run to "
              f"{result[0]['moved']}", file=sys.stderr, flush=True)
    return result[0]["fingerprint"]


def _peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _run_info(prep: Prepared, per_rank: list[dict], num_batches_total: int) -> dict:
    import dice_ds

    opts, plan = prep.opts, prep.plan
    info = dict(per_rank[0].get("runtime") or {})  # runtime.stats() of rank 0, then ours on top
    stats = [r.get("runtime") or {} for r in per_rank]
    seconds = max(sum(r["batch_seconds"]) for r in per_rank)
    samples_run = per_rank[0]["samples_run"]
    fp = per_rank[0]["fingerprint"]
    info.update({
        "images_per_second": samples_run / seconds if seconds > 0 else 0.0,
        "samples_run": samples_run,
        # bytes that left a rank in the EP all-to-alls and SP all-gathers (all ranks), the
        # largest stale cache (EP outputs + displaced-SP K/V buffers)
        "bytes_exchanged": sum((s.get("a2a_bytes_sent_remote", s.get("a2a_bytes_sent", 0)) or 0)
                               + (s.get("sp_bytes_exchanged") or 0) for s in stats),
        "cache_peak_bytes": max((s.get("ep_cache_peak_bytes") or 0)
                                + (s.get("sp_kv_buffer_bytes") or 0) for s in stats),
        "sample_dir": prep.sample_dir, "dice_ds_version": dice_ds.__version__,
        "git_commit": _git_commit(), "start_time": per_rank[0]["start_time"],
        "host": per_rank[0]["host"], "hosts": sorted({r["host"] for r in per_rank}),
        "checkpoint_sha256": fp.get("checkpoint_sha256"), "fingerprint": fp,
    })
    info.update({
        "model": opts.model, "mode": mode_name(plan), "world_size": prep.world_size,
        "ep_size": plan.ep_size, "sampler": sampler_of(opts), "num_steps": steps_of(opts),
        "num_samples": opts.num_fid_samples, "cfg_scale": opts.cfg_scale,
        "image_size": image_size_of(opts),
        "per_proc_batch_size": opts.per_proc_batch_size, "global_seed": opts.global_seed,
        "dtype": opts.dtype, "device": prep.device, "vae": opts.vae,
        "num_experts": prep.model_cfg.num_experts,
        "sampling_seconds": seconds,
        "batch_sampling_seconds": per_rank[0]["batch_seconds"],
        "batches_total": num_batches_total, "batches_run": per_rank[0]["batches_run"],
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in per_rank),
        "startup": per_rank[0].get("startup"),  # rank 0's; every rank's is under per_rank
        "per_rank": per_rank,
        "index_formula": "index = batch*per_proc_batch_size*world_size + i*world_size + rank",
        "plan": dataclasses.asdict(plan),
        "args": {k: v for k, v in dataclasses.asdict(opts).items() if k != "explicit"},
        "explicit_args": sorted(opts.explicit),
    })
    return info


def _finish(prep: Prepared, out, rank: int, world: int, mine: dict) -> dict | None:
    """Gather per-rank measurements; rank 0 assembles npz, grid and run.json."""
    import torch.distributed as dist

    from dice_ds.diffusion import labels_for
    from dice_ds.outputs import num_batches

    per_rank = [None] * world
    dist.all_gather_object(per_rank, mine)
    if rank != 0:
        return None
    opts = prep.opts
    previous = os.path.join(out.path, "run.json")
    if mine["batches_run"] == 0 and os.path.isfile(previous):
        # every batch was already done: keep the measurements of the run that produced them
        with open(previous) as fh:
            return {**json.load(fh), "already_complete": True}
    info = _run_info(prep, per_rank, num_batches(opts.num_fid_samples, world,
                                                 opts.per_proc_batch_size))
    indices = list(range(opts.num_fid_samples))
    if not opts.trim_samples:
        info["npz"] = out.assemble(indices, labels_for(opts.global_seed, indices,
                                                       prep.model_cfg.num_classes))
    info["grid"] = out.write_grid(indices)
    out.write_run_json(info, lead=RUN_JSON_LEAD)
    return info


def run(prep: Prepared) -> dict | None:
    """The sampling run on this rank; returns rank 0's run.json content (None on other ranks)."""
    import torch
    import torch.distributed as dist

    import socket

    from dice_ds.outputs import SampleDir
    from dice_ds.parallel.groups import build_model_groups, init_distributed
    from dice_ds.runenv import summary_line
    from dice_ds.vae import build_decoder

    opts = prep.opts
    start_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if prep.device == "cuda":
        torch.cuda.set_device(_local_rank(opts))
        torch.backends.cuda.matmul.allow_tf32 = opts.tf32
        torch.backends.cudnn.allow_tf32 = opts.tf32
    with prep.startup.phase("process_groups"):
        rank, world = init_distributed(prep.device, timeout=opts.pg_timeout)
    if world != prep.world_size:
        raise RuntimeError(f"world size {world} differs from the launcher's {prep.world_size}")
    out = SampleDir(prep.sample_dir, latents_only=opts.vae == "none")
    fingerprint = _claim_sample_dir(prep, out, rank)
    torch.manual_seed(opts.global_seed * world + rank)
    with prep.startup.phase("process_groups"):
        groups = build_model_groups(prep.plan.ep_size)
    model, runtime = _build(prep, groups)
    _time_first_step(model, prep.startup)
    decoder = build_decoder(opts.vae, opts.vae_path, prep.device, prep.model_cfg.in_channels)
    mine = _sample_loop(prep, model, runtime, decoder, out, rank, world)
    mine.update(rank=rank, peak_memory_bytes=_peak_memory_bytes(prep.device),
                runtime=runtime.stats() if runtime is not None else None,
                startup=prep.startup.as_dict(),
                host=socket.gethostname(), start_time=start_time, threads=torch.get_num_threads())
    if rank == 0:
        mine["fingerprint"] = fingerprint
    info = _finish(prep, out, rank, world, mine)
    dist.barrier()
    out.release()  # the directory's run lock (dice_ds/runlock.py); a crash frees it by exiting
    if rank == 0 and info.get("already_complete"):
        print(f"dice-ds sample: all {opts.num_fid_samples} samples already exist in "
              f"{prep.sample_dir}; nothing to do (delete it to sample again)", flush=True)
    elif rank == 0:
        print(summary_line(info, prep.sample_dir), flush=True)
    return info


def _fail(e: BaseException) -> None:
    """End this rank at once (never wait in a collective): 2 for bad input, 1 otherwise."""
    from dice_ds.runenv import PeerFailure, is_peer_failure

    rank = env_rank()
    if isinstance(e, ConfigError):  # found after the process group started (e.g. the sample dir)
        code, text = 2, f"dice-ds sample: error: {e}" if rank == 0 else None
    elif isinstance(e, PeerFailure):
        code, text = 1, f"dice-ds sample: error: {e}"
    elif is_peer_failure(e):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        code, text = 1, (f"dice-ds sample: error: rank {rank}: outside the sampling loop: peer "
                         f"failed/timed out ({type(e).__name__}: {first})")
    else:
        code, text = 1, f"[rank {rank}] dice-ds sample failed:\n{traceback.format_exc()}"
    if text:
        print(text, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def import_heavy_modules() -> None:
    """Import what every run needs (torch, megatron-core's MoE layer) in one timed place."""
    import torch  # noqa: F401
    from megatron.core.transformer.moe import moe_layer  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 2 on bad input (before any process group), exits 1 if a rank fails.

    The one place the program starts: sizes the thread pool (before torch is imported) and filters
    third-party noise (``dice_ds.runenv``; ``--verbose`` keeps it).
    """
    from dice_ds.runenv import configure_threads, quiet_third_party

    before_main = seconds_since_process_start()
    try:
        opts = parse_options(argv)
        configure_threads()
        quiet_third_party(opts.verbose)
        log = StartupLog()
        with log.phase("imports"):  # torch and megatron-core: most of a rank's start-up
            import_heavy_modules()
        with log.phase("prepare"):  # options, checkpoint header, plan: no tensor read yet
            prep = prepare(opts)
        log.facts["before_main"] = before_main
        prep.startup = log
    except ConfigError as e:
        if env_rank() == 0:
            print(f"dice-ds sample: error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        run(prep)
    except BaseException as e:  # noqa: BLE001 - every failure must end this rank promptly
        _fail(e)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def exit_after(code: int) -> None:
    """End a finished process without interpreter teardown.

    Rarely (seen once in ~30 two-rank displaced-SP runs on loopback, not reproduced since) a rank
    aborted AFTER its outputs were complete and its process group destroyed ("terminate called
    without an active exception": a gloo thread still joinable during teardown). Every handle is
    waited before that point (``KVCommManager.reset``), so nothing is lost by skipping teardown;
    the exit code then is the run's, not the abort's. Only the command-line entry points call this
    (``main()`` itself returns, for in-process callers)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_after(main())
