"""Building a pipeline's model and parallel runtime, once, on the process groups of its plan.

Owns ``build_model_and_runtime``: the model on the meta device, each parameter materialised once
(``dice_ds.models.build_model``), the checkpoint streamed in (``dice_ds.weights.load.load_into_model``:
this rank's tensors only, one at a time; what was assumed about it or replaced in it stated once, by
rank 0, instead of a warning per rank) or ``init_weights``, then the plan applied
(``parallelize_dit_moe``: the EP runtime, with SP a ``RuntimeStack``); and ``time_first_step``.
With ``--expert-placement balanced`` a model with megatron's contiguous placement is built and
loaded first, one calibration forward measures the routing (``dice_ds.pipeline.calibrate``), and
the model is built again with the computed placement (phase ``expert_placement``; the first model
is freed before the second is built, so the peak memory is one model's).
Each part is a phase of the rank's ``StartupLog`` (``model_build``, ``weight_load``,
``first_step``; run.json's ``startup``), with the facts run.json reports (``memory_before_build``,
``bytes_read``, ``checkpoint_reader``, ``dropped_expert_tensors``, ``param_bytes``, and with
``DICE_DS_READ_BASELINE=1`` the plain-read floor ``plain_read``).

Invariant: collective where the groups are (every rank of the world calls it, in the same order).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch.distributed as dist

from dice_ds.launch_env import env_rank
from dice_ds.models import DTYPES, build_model, init_weights
from dice_ds.pipeline.calibrate import balanced_placement
from dice_ds.pipeline.prepare import state_checkpoint_notes
from dice_ds.placement import BALANCED
from dice_ds.startup import memory_now
from dice_ds.weights.load import load_into_model, time_plain_read
from dice_ds.weights.read import open_checkpoint


def progress_bars() -> bool:
    """Progress bars on rank 0 of a terminal (the CLI's ``Progress`` decides the same)."""
    return env_rank() == 0 and sys.stderr.isatty()


def build_model_and_runtime(spec, groups):
    """Model with weights, and its parallel runtime (None only without ``parallelize``)."""
    opts, log = spec.opts, spec.startup
    log.facts["memory_before_build"] = memory_now()  # what build + load add is measured from here
    if spec.placement == BALANCED:
        with log.phase("expert_placement"):
            spec.placement = _calibrated(spec, groups)
    with log.phase("model_build"):  # meta device, then each parameter once on the device
        model = build_model(spec.model_cfg, groups, DTYPES[opts.dtype], spec.device,
                            placement=spec.placement)
    if spec.checkpoint is not None and os.environ.get("DICE_DS_READ_BASELINE") == "1":
        log.facts["plain_read"] = time_plain_read(model, spec.checkpoint)  # the I/O floor
    with log.phase("weight_load"):
        if spec.checkpoint is not None:
            state_checkpoint_notes(spec, dist.get_rank() if dist.is_initialized() else 0)
            with spec.checkpoint as reader, warnings.catch_warnings():  # this rank's tensors only
                # a replaced pos_embed was stated once above (rank 0), not once per rank
                warnings.filterwarnings("ignore", message="checkpoint pos_embed has")
                result = load_into_model(model, reader, progress=progress_bars())
            log.facts.update(bytes_read=result.bytes_read, checkpoint_reader=reader.kind,
                             dropped_expert_tensors=result.dropped_expert_keys)
            spec.checkpoint = None
        else:
            init_weights(model, opts.init, seed=opts.init_seed)
    log.facts["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    runtime = spec.parallelize(model, spec.plan, groups) if spec.parallelize else None
    return model, runtime


def _calibrated(spec, groups):
    """The balanced placement of this job, measured on a contiguous model (module doc)."""
    opts = spec.opts
    model = build_model(spec.model_cfg, groups, DTYPES[opts.dtype], spec.device)
    if spec.checkpoint is not None:
        with spec.checkpoint as reader, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="checkpoint pos_embed has")
            load_into_model(model, reader)
        spec.checkpoint = open_checkpoint(opts.ckpt)  # the placed model's load reads it again
    else:
        init_weights(model, opts.init, seed=opts.init_seed)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    placement = balanced_placement(model, opts, spec.plan.ep_size, rank, world)
    del model
    return None if placement.is_contiguous else placement


def time_first_step(model, log) -> None:
    """Open the ``first_step`` phase at the model's first forward and close it after."""
    handles = []

    def pre(module, args):
        log.begin("first_step")

    def post(module, args, output):
        log.end("first_step")
        for h in handles:
            h.remove()

    handles += [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
