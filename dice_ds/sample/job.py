"""The sample-directory job of ``dice-ds sample`` on ``DiTMoEPipeline`` (entry: ``dice_ds.sample.entry``).

Owns the job: options -> ``prepare`` (``dice_ds.pipeline.prepare``'s checks plus the sample
directory; every ConfigError is raised here, before any process group starts) -> ``run`` (process
groups, the directory's claim and fingerprint, the pipeline, the batch loop with resume, per-index
files, npz, grid, ``run.json``). Sampling itself (model, parallel runtime, sampler, each sample's
noise and label) is the pipeline's (``dice_ds.pipeline``): batch b is one pipeline call with
``batch_size = n·W``, ``first_index = b·n·W``, ``seed = --global-seed``, ``output_ranks='local'``,
which samples exactly what this loop sampled before the pipeline existed (bitwise).

Launch with ``torchrun --nproc_per_node W -m dice_ds.sample ...``, the deepspeed launcher
(``deepspeed --num_gpus W --module dice_ds.sample ...``; its ``--local_rank=N`` is accepted), slurm
(``srun`` with MASTER_ADDR/MASTER_PORT set), or plain ``python`` (one rank). Backend: gloo on CPU,
NCCL on CUDA. This module imports torch; ``dice_ds.sample.entry`` imports it only after the flags
and the environment passed their checks.

Invariants:
- Sample index j's noise and label come from a generator seeded by (global seed, j) (see
  ``dice_ds.diffusion``), and ranks take indices by the reference's formula (``dice_ds.outputs``), so
  any world size writes the same image for every index, and a resumed run equals an uninterrupted one.
  The global torch RNG is still seeded DiT-style with ``global_seed·W + rank``; no draw uses it.
- Every rank runs the same batches (EP ranks exchange tokens each step): a batch is skipped on resume
  only when its files exist on every rank (one all-reduce before the loop).
- A failing rank ends at once (``dice_ds.sample.entry``); the launcher (torchrun, deepspeed) then
  stops the other ranks instead of leaving them in a collective.
  Every collective has the run's timeout (``--pg-timeout``, ``dice_ds.parallel.groups``): a rank
  whose peer died or stopped prints one line naming itself, the step and the batch
  (``dice_ds.runenv.PeerFailure``) and exits 1 within that time, under any launcher.
- ``sampling_seconds`` times the sampler loops only (VAE decoding and file writes excluded); each
  rank's ``batch_cpu_seconds`` (run.json ``per_rank``) is its process's CPU time over the same loops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

import dice_ds
from dice_ds.config import ConfigError
from dice_ds.diffusion import labels_for
from dice_ds.options import (
    RunOptions,
    auto_sample_dir,
    check_sample_dir,
    image_size_of,
    mode_name,
    sampler_of,
    steps_of,
)
from dice_ds.outputs import (
    SampleDir,
    batch_indices,
    dir_sha256,
    file_sha256,
    num_batches,
    run_fingerprint,
)
from dice_ds.parallel.groups import group_timeout
from dice_ds.pipeline import DiTMoEPipeline
from dice_ds.pipeline.output import exchange_totals, rank_exchange
from dice_ds.pipeline.prepare import PipelineSpec, connect, prepare_spec
from dice_ds.placement import Placement, routing_counts, run_record
from dice_ds.runenv import (
    PeerFailure,
    Progress,
    is_peer_failure,
    summary_line,
)


@dataclass
class Prepared(PipelineSpec):
    """Everything decided before the process group starts: the pipeline's spec and the directory."""

    sample_dir: str = ""


def prepare(opts: RunOptions, world_size: int | None = None) -> Prepared:
    """Resolve everything that can fail on bad input; raises ConfigError. Starts no process group.

    ``world_size``: the number of ranks the run will have (default: what the launcher announced in
    the environment; tests that start ranks themselves pass it).
    """
    spec = prepare_spec(opts, world_size)
    sample_dir = opts.sample_dir
    if sample_dir is None:  # --sample-dir itself was checked with the options
        sample_dir = check_sample_dir(auto_sample_dir(opts, spec.plan, spec.world_size),
                                      "the automatic sample directory")
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(PipelineSpec)}
    return Prepared(**fields, sample_dir=sample_dir)


# ---------------------------------------------------------------------------------------------------
# the run (process groups exist from here on)
# ---------------------------------------------------------------------------------------------------


def _todo_batches(out, prep: Prepared, rank: int, world: int) -> list[int]:
    """Batches that some rank still has to write (agreed by an all-reduce MIN over the world)."""
    import torch
    import torch.distributed as dist

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


def _sample_loop(prep: Prepared, pipe, out, rank: int, world: int) -> dict:
    """Run the batches still to do, one pipeline call each; returns this rank's timings.

    The pipeline samples and decodes (``output_type='pil'``: the bytes written; 'latent' with
    ``--vae none``). A collective that fails because a peer died or timed out becomes a
    ``PeerFailure`` naming this rank, the step the pipeline's loop was in and the batch.
    """
    opts = prep.opts
    steps = steps_of(opts)
    todo = _todo_batches(out, prep, rank, world)
    n, total = opts.per_proc_batch_size, opts.num_fid_samples
    progress = Progress(sum(_batch_samples(b, total, world, n) for b in todo), enabled=rank == 0)
    output_type = "latent" if pipe.decoder is None else "pil"
    seconds, cpu = [], []
    try:
        for b in todo:
            keep = _written(batch_indices(b, rank, world, n), total, opts.trim_samples)
            try:  # this rank's own samples: indices b·n·W + i·W + rank, in i order; the kept
                # indices are a prefix of them, and only those are decoded
                result = pipe(batch_size=n * world, first_index=b * n * world,
                              seed=opts.global_seed, num_inference_steps=steps,
                              guidance_scale=opts.cfg_scale, output_type=output_type,
                              output_ranks="local", reset_stats=False, local_limit=len(keep))
            except Exception as e:
                if world > 1 and is_peer_failure(e):
                    raise _peer_failure(pipe.position, rank, b, e,
                                        group_timeout().total_seconds()) from e
                raise
            seconds += result.stats["sub_batch_seconds"]
            cpu += result.stats["sub_batch_cpu_seconds"]
            if pipe.decoder is None:
                out.write_latents(keep, result.images.numpy())
            elif keep:
                out.write_images(keep, [np.asarray(img) for img in result.images])
            progress.update(_batch_samples(b, total, world, n))
    finally:
        progress.close()
    return {"batch_seconds": seconds, "batch_cpu_seconds": cpu, "batches_run": len(todo),
            "samples_run": sum(_batch_samples(b, total, world, n) for b in todo)}


def _peer_failure(position, rank: int, batch: int, exc: BaseException, timeout_s: float):
    """The one line a rank prints when a collective failed because of a peer: where the
    pipeline's loop was (``LoopPosition``), since when, and the collective's error."""

    waited = time.monotonic() - position.started
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return PeerFailure(f"rank {rank}: {position.describe()} of batch {batch}: peer failed/timed "
                       f"out after {waited:.1f} s (collective timeout {timeout_s:g} s; "
                       f"{type(exc).__name__}: {first})")


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
    if prep.regenerated_pos_embed:  # likewise: only runs that replaced the checkpoint's table
        settings["regenerated_pos_embed"] = True
    if prep.placement is not None:  # likewise: an expert placement (rounding may differ)
        settings["expert_placement"] = (prep.placement.to_json()["layers"]
                                        if isinstance(prep.placement, Placement)
                                        else [prep.placement, opts.expert_replicas])
    return run_fingerprint(settings=settings, plan_fields=dataclasses.asdict(plan),
                           world_size=prep.world_size, per_proc_batch_size=opts.per_proc_batch_size)


def _claim_sample_dir(prep: Prepared, out, rank: int) -> dict:
    """Rank 0 hashes the weights, checks the directory's fingerprint (refuses a mix of runs, or
    moves the old samples aside with --force-new) and tells every rank; returns the fingerprint."""
    import torch.distributed as dist

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


def _run_info(prep: Prepared, per_rank: list[dict], num_batches_total: int, layout: dict) -> dict:

    opts, plan = prep.opts, prep.plan

    info = dict(per_rank[0].get("runtime") or {})  # runtime.stats() of rank 0, then ours on top
    seconds = max(sum(r["batch_seconds"]) for r in per_rank)
    samples_run = per_rank[0]["samples_run"]
    fp = per_rank[0]["fingerprint"]
    info.update({
        "images_per_second": samples_run / seconds if seconds > 0 else 0.0,
        "samples_run": samples_run,
        # bytes that left a rank in the EP all-to-alls and SP all-gathers (all ranks), the
        # largest stale cache (EP outputs + displaced-SP K/V buffers)
        **exchange_totals([rank_exchange(r.get("runtime")) for r in per_rank]),
        "sample_dir": prep.sample_dir, "dice_ds_version": dice_ds.__version__,
        "git_commit": _git_commit(), "start_time": per_rank[0]["start_time"],
        "host": per_rank[0]["host"], "hosts": sorted({r["host"] for r in per_rank}),
        # the rank layout, why it was chosen, which groups (EP, expert-DP, SP) have members on
        # more than one host (dice_ds/parallel/topology.py)
        "layout": layout,
        "checkpoint_sha256": fp.get("checkpoint_sha256"), "fingerprint": fp,
        # what was assumed about the checkpoint or replaced in it (dice_ds/weights/check.py)
        "checkpoint_notes": list(prep.checkpoint_notes),
        "regenerated_pos_embed": prep.regenerated_pos_embed,
        # the expert placement used and the routing rows it met (dice_ds/placement.py)
        "expert_placement": run_record(prep.placement, plan.ep_size,
                                       [r.get("routing") or {} for r in per_rank]),
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
        "args": opts.names(),
        "explicit_args": sorted(opts.explicit),
    })
    return info


def _finish(prep: Prepared, out, rank: int, world: int, mine: dict, layout: dict
            ) -> dict | None:
    """Gather per-rank measurements; rank 0 assembles npz, grid and run.json (``layout``: the
    pipeline's rank layout record)."""
    import torch.distributed as dist

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
                                                 opts.per_proc_batch_size), layout)
    indices = list(range(opts.num_fid_samples))
    if not opts.trim_samples:
        info["npz"] = out.assemble(indices, labels_for(opts.global_seed, indices,
                                                       prep.model_cfg.num_classes))
    info["grid"] = out.write_grid(indices)
    out.write_run_json(info, lead=RUN_JSON_LEAD)
    return info


def run(prep: Prepared) -> dict | None:
    """The sampling run on this rank; returns rank 0's run.json content (None on other ranks)."""
    import socket

    import torch
    import torch.distributed as dist

    opts = prep.opts
    start_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rank, world = connect(prep)  # the default group (phase process_groups)
    out = SampleDir(prep.sample_dir, latents_only=opts.vae == "none")
    fingerprint = _claim_sample_dir(prep, out, rank)  # before any weight is read
    torch.manual_seed(opts.global_seed * world + rank)
    pipe = DiTMoEPipeline(prep, output_ranks="local")  # groups, model, runtime, decoder: once
    pipe.set_progress_bar_config(disable=True)  # the job's own Progress counts the batches
    mine = _sample_loop(prep, pipe, out, rank, world)
    mine.update(rank=rank, peak_memory_bytes=_peak_memory_bytes(prep.device),
                runtime=pipe.runtime.stats() if pipe.runtime is not None else None,
                routing=routing_counts(pipe.model),
                startup=prep.startup.as_dict(),
                host=socket.gethostname(), start_time=start_time, threads=torch.get_num_threads())
    if rank == 0:
        mine["fingerprint"] = fingerprint
    info = _finish(prep, out, rank, world, mine, pipe.placement.record())
    dist.barrier()
    out.release()  # the directory's run lock (dice_ds/runlock.py); a crash frees it by exiting
    if rank == 0 and info.get("already_complete"):
        print(f"dice-ds sample: all {opts.num_fid_samples} samples already exist in "
              f"{prep.sample_dir}; nothing to do (delete it to sample again)", flush=True)
    elif rank == 0:
        print(summary_line(info, prep.sample_dir), flush=True)
    return info
