"""diffusers' pipeline words on ``DiTMoEPipeline``: the scheduler, class names, device and dtype,
the progress bar and the step callback.

Owns ``DiffusersWords`` (the mixin ``DiTMoEPipeline`` inherits) and ``StepEnd`` (what runs after
every denoising step of a call: the progress bar, ``callback_on_step_end``, an early stop agreed by
every rank).

- ``scheduler``: a diffusers scheduler object. Until it is read or set the pipeline runs the
  flavor's hand-written sampler and never imports diffusers (``dice-ds sample``, ``import
  dice_ds``); reading it gives the default (``dice_ds.diffusion.schedulers``: the same sampler
  behind diffusers' interface, bitwise); setting it checks that it fits the flavor's training
  objective (one ConfigError line otherwise).
- ``labels`` / ``id2label`` / ``get_label_ids(words)``: ``dice_ds.labels``.
- ``device``, ``dtype`` (a ``torch.dtype``), ``to(device, dtype)``: a one-process pipeline is
  rebuilt on the new device / dtype (model, runtime and decoder; the weights are read again);
  moving to where it already is does nothing, on any number of ranks; moving a pipeline of W > 1
  ranks is refused in one line (each rank is placed when the pipeline is built: pass
  ``device=``/``torch_dtype=`` to ``from_pretrained``).
- ``set_progress_bar_config(**tqdm kwargs)`` / ``progress_bar(iterable, total)``: as in
  diffusers; a call shows one bar over rank 0's steps (all its sub-batches), by default only when
  stderr is a terminal (tqdm's ``disable=None``); ``disable=True`` hides it.
- ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` with
  ``callback_on_step_end_tensor_inputs`` (only ``"latents"``): called on rank 0 after each step
  of each of its sub-batches (``step`` counts from 0 within the sub-batch, ``timestep`` is the
  model's time input), with rank 0's latents; a returned ``"latents"`` replaces them. Setting
  ``pipe._interrupt = True`` in it (diffusers' way) stops the call on every rank after that step:
  with W > 1 the flag is all-reduced after every step (one small collective per step, only when a
  callback is given; a rank with fewer sub-batches joins the remaining exchanges after its loop, so
  every rank makes the same number), and the images are the latents as they are then (later
  sub-batches keep their initial noise).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dice_ds.config import ConfigError
from dice_ds.diffusion import step_rule
from dice_ds.ds_config import dtype_name, merge, settings_of, to_json, tree_of
from dice_ds.labels import id2label, label_ids, word_index
from dice_ds.models import DTYPES

CALLBACK_TENSORS = ("latents",)


class DiffusersWords:
    """The diffusers names of ``DiTMoEPipeline`` (module docstring); needs ``spec``,
    ``sampler_name``, ``world_size`` and ``_rebuild``."""

    _scheduler = None
    _interrupt = False

    # -- the scheduler ------------------------------------------------------------------------------
    @property
    def scheduler(self):
        """The scheduler object (default: the flavor's sampler as a diffusers scheduler)."""
        if self._scheduler is None:
            from dice_ds.diffusion.schedulers import default_scheduler

            self._scheduler = default_scheduler(self.sampler_name)
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        from dice_ds.diffusion.schedulers import check_fits

        check_fits(value, self.sampler_name, self.spec.opts.model)
        self._scheduler = value

    def step_rule(self, num_steps: int):
        """The call's step rule: the hand-written sampler (default scheduler), or the scheduler's."""
        if self._scheduler is None:
            return step_rule(self.sampler_name, num_steps)
        from dice_ds.diffusion.schedulers import DiTMoEScheduler, SchedulerRule

        if isinstance(self._scheduler, DiTMoEScheduler):
            return self._scheduler.step_rule(num_steps)
        cfg = self.spec.model_cfg
        return SchedulerRule(self._scheduler, num_steps, self.sampler_name, cfg.in_channels,
                             cfg.learn_sigma)

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- class names ----------------------------------------------------------------------------------
    @property
    def id2label(self) -> dict[int, str] | None:
        """{class id: comma-separated names}, or None for a model without names."""
        return id2label(self.spec.opts.model, self.spec.model_cfg.num_classes)

    @property
    def labels(self) -> dict[str, int]:
        """{word: class id}, sorted (diffusers' ``DiTPipeline.labels``)."""
        return word_index(self.id2label)

    def get_label_ids(self, label) -> list[int]:
        """Class ids of a word or a list of words (one ConfigError line for an unknown word)."""
        return label_ids(self.labels, label)

    # -- device and dtype ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.spec.opts.dtype]

    def to(self, *args, **kwargs):
        """``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``, ``pipe.to(device, dtype)`` (module
        docstring); returns the pipeline."""
        device, dtype = kwargs.pop("torch_device", kwargs.pop("device", None)), kwargs.pop(
            "dtype", None)
        if kwargs:
            raise ConfigError(f"pipe.to(): unknown keyword {next(iter(kwargs))!r}; use "
                              "pipe.to(device, dtype)")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        want = {}
        if device is not None:
            try:
                kind = torch.device(device).type
            except (RuntimeError, TypeError):
                raise ConfigError(f"pipe.to({device!r}): use 'cpu' or 'cuda'") from None
            if kind != self.spec.device:
                want["device"] = kind
        if dtype is not None and dtype_name(dtype) != self.spec.opts.dtype:
            want["dtype"] = dtype_name(dtype)
        if not want:
            return self
        if self.world_size > 1:
            asked = ", ".join(f"{k}={v}" for k, v in want.items())
            raise ConfigError(f"pipe.to({asked}): a pipeline on {self.world_size} ranks is placed "
                              "when it is built (each rank on its LOCAL_RANK's device); pass "
                              "device=... / torch_dtype=... to DiTMoEPipeline.from_pretrained")
        opts = self.spec.opts
        tree = merge(to_json(opts, full=True), tree_of(want, flags=False))
        self._rebuild(settings_of(tree, explicit=opts.explicit | set(want),
                                  local_rank=opts._local_rank))
        return self

    # -- progress bar -------------------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with the pipeline's progress-bar config (diffusers' method)."""
        config = {"disable": None, **getattr(self, "_progress_bar_config", {})}
        return tqdm(iterable, total=total, **config)


def check_callback(callback, tensor_inputs) -> tuple:
    """The step callback's tensor inputs (a callback object's own ``tensor_inputs`` win, as in
    diffusers); one ConfigError line for a bad one."""
    if callback is None:
        return ()
    if not callable(callback):
        raise ConfigError("callback_on_step_end: pass a function (pipe, step, timestep, "
                          "callback_kwargs) -> dict")
    names = getattr(callback, "tensor_inputs", None) or tensor_inputs or ["latents"]
    bad = [n for n in names if n not in CALLBACK_TENSORS]
    if bad:
        raise ConfigError(f"callback_on_step_end_tensor_inputs: {bad[0]!r} is not a tensor of "
                          f"this pipeline's loop; use {list(CALLBACK_TENSORS)}")
    return tuple(names)


class StepEnd:
    """After every step of a call on this rank (module docstring): the bar, the callback, the stop.

    ``ticks``: the most steps any rank runs in this call (its sub-batches × S), the number of stop
    flags every rank exchanges when ``collective``."""

    def __init__(self, pipe, callback, tensor_inputs: tuple, rank: int, ticks: int, own: int,
                 collective: bool, device: str):
        self.pipe, self.callback, self.inputs = pipe, callback, tensor_inputs
        self.rank, self.ticks, self.done, self.collective = rank, ticks, 0, collective
        self.stopped = False
        self.device = "cuda" if device == "cuda" else "cpu"
        self.bar = pipe.progress_bar(total=own) if rank == 0 else None

    def __call__(self, k: int, t: float, x: torch.Tensor):
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        stop = False
        if self.callback is not None:
            if self.rank == 0:
                x = self._callback(k, t, x)
                stop = bool(self.pipe._interrupt)
            if self.collective:
                stop = self._agree(stop)
        self.stopped = stop
        return x, stop

    def _callback(self, k: int, t: float, x: torch.Tensor) -> torch.Tensor:
        out = self.callback(self.pipe, k, t, {name: x for name in self.inputs})
        new = (out or {}).get("latents", x)
        if not isinstance(new, torch.Tensor) or new.shape != x.shape:
            raise ConfigError("callback_on_step_end returned latents of shape "
                              f"{getattr(new, 'shape', type(new).__name__)}; return a tensor of "
                              f"the shape it was given ({list(x.shape)}) or leave it out")
        return new.to(x.device, x.dtype)

    def _agree(self, stop: bool) -> bool:
        flag = torch.tensor([int(stop)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def finish(self) -> None:
        """Join the stop exchanges this rank's loop did not make (it ran fewer steps)."""
        if self.collective and self.callback is not None:
            while not self.stopped and self.done < self.ticks:
                self.done += 1
                self.stopped = self._agree(False)
        if self.bar is not None:
            self.bar.close()
