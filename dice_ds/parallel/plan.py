"""The parallel plan: plain data saying how a DiT-MoE is parallelised for sampling.

Owns ``ParallelPlan`` (expert-parallel size, DICE mode and every DICE knob; sequence-parallel size
and displaced-SP knobs) and its validation. A run's plan is built one to one from the parallelism
sections of the settings tree (``dice_ds.ds_config``: ``moe``, ``dice.async``,
``dice.conditional_comm``, ``dice.communication``, ``dice.sp``) by ``dice_ds.options.build_plan``;
the choices it accepts are the tree's, the size checks are ``dice_ds.parallel.dims.ParallelDims``'.
Building a plan is inert; ``validate()`` raises ``ConfigError`` naming the field (and CLI flag) and
the fix, before any process group starts. ``dice_ds.parallel.apply.parallelize_dit_moe`` turns a
plan into a runtime.

Conventions: the sampler's step index i counts *down* from S to 1 (rev = S − i, rev 0 is the first
step). ``async_layers`` names the MoE layers that run asynchronously (the reference's
``--ep-async-mode`` convention); every other layer stays synchronous.

Rank layout (which global ranks form the EP and SP groups) is not part of the plan: it is the
``rank_layout`` setting, chosen on the ranks' hosts when the groups are built
(``dice_ds.parallel.dims``, ``dice_ds.parallel.topology``). The default on one host: EP innermost
(contiguous blocks of ep_size ranks), SP next (stride ep_size), data parallel outermost; world 4,
ep 2, sp 2 gives EP groups [0,1] [2,3] and SP groups [0,2] [1,3].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Union

from dice_ds.config import ConfigError
from dice_ds.ds_config import (
    ASYNC_LAYER_SETS,
    ASYNC_MODES,
    DTYPES,
    SKIP_STRATEGIES,
    STALE_WEIGHTS,
    Async,
    Communication,
    ConditionalComm,
    SequenceParallel,
)
from dice_ds.parallel.dims import ParallelDims

EP_MODES = ("sync", *ASYNC_MODES)
EPMode = Literal[EP_MODES]
AsyncLayers = Union[Literal[ASYNC_LAYER_SETS], tuple[int, ...]]


def _default(section, key: str):
    """The settings tree's default of a field (the plan's defaults are the tree's)."""
    return section.model_fields[key].default


@dataclass(frozen=True)
class ParallelPlan:
    """How to parallelise one sampling run."""

    ep_size: int = 1
    """Expert-parallel group size (1: no EP, pure data parallelism). Must divide the world size and
    the expert count. Which ranks form the EP groups: the rank layout (module docstring); the rest
    of the world is data parallel."""
    mode: EPMode = "sync"
    """'sync': megatron's all-to-all dispatcher. 'displaced': DICE displaced EP (2-step-stale expert
    outputs). 'interweaved': DICE interweaved EP (1-step staleness, half the cache)."""
    async_layers: AsyncLayers = _default(Async, "layers")
    """Which MoE layers run async (others stay sync): 'all'; 'shallow' = l < L/2 (DICE's choice,
    the paper's "deep sync"); 'deep' = l >= L/2; 'interleaved' = even l; or explicit indices."""
    warmup: int = _default(Async, "warm_up")
    """Steps rev = 0..warmup are synchronous (warmup + 1 sync steps; the first is always sync)."""
    cooldown: int = _default(Async, "cool_down")
    """The last ``cooldown`` steps (i <= cooldown) are synchronous. Works on its own."""
    strided: int = _default(Async, "strided_sync")
    """Every step with i % strided == 0 is synchronous (0: off)."""
    stale_output_weights: Literal[STALE_WEIGHTS] = _default(Async, "stale_output_weights")
    """Router weights multiplying a stale expert output: 'cached' = the weights of the step the
    output came from (consistent; default); 'current' = this step's top-k weights, slot by slot."""
    skip_period: int = _default(ConditionalComm, "period")
    """Conditional communication: slots are skipped on steps with i % skip_period != 0 (1: off)."""
    skip_strategy: Literal[SKIP_STRATEGIES] | None = _default(ConditionalComm, "strategy")
    """Which of a token's two slots is skipped: 'low' (lower router score), 'high', 'rand'."""
    skip_seed: int = 0
    """Seed of the 'rand' strategy's generator (reset with the other per-run state)."""
    payload_dtype: Literal[DTYPES] | None = _default(Communication, "payload_dtype")
    """dtype of the all-to-all payload (None: the activation dtype). bf16/fp16 halve the bytes."""
    ep_overlap: bool = _default(Communication, "overlap")
    """Overlapped sync calls: every sync MoE call runs as two micro-batches whose exchanges and
    expert compute overlap (``dice_ds.schedule.Call.overlap``); outputs stay fresh."""
    sp_size: int = 1
    """Sequence-parallel group size (1: off). Each image's tokens are split into sp_size
    contiguous chunks; attention gathers K/V over the group; every rank holds all experts unless
    ep_size > 1 as well (EP x SP: each token shard's expert work goes over the EP group)."""
    sp_async: bool = False
    """Displaced SP (DistriFusion): remote K/V from the previous step, own K/V fresh."""
    sp_warmup: int = _default(SequenceParallel, "async_warm_up")
    """Displaced SP: steps rev = 0..sp_warmup gather K/V synchronously (the cache is cleared)."""
    single_img: bool = _default(SequenceParallel, "single_img")
    """SP without the global batch: each SP group samples one rank's batch (the SP group's lead
    rank writes it); otherwise every SP rank holds the batches of its whole group."""
    sp_bucket_layers: int = 4
    """Displaced SP: layers whose K/V share one async all-gather (DistriFusion's comm_checkpoint)."""

    def replace(self, **changes) -> "ParallelPlan":
        return dataclasses.replace(self, **changes)

    @property
    def ep_enabled(self) -> bool:
        return self.ep_size > 1

    @property
    def async_enabled(self) -> bool:
        return self.ep_enabled and self.mode != "sync"

    @property
    def sp_enabled(self) -> bool:
        return self.sp_size > 1

    def validate(self, *, world_size: int, num_experts: int, depth: int,
                 tokens: int | None = None) -> "ParallelPlan":
        """Raise ``ConfigError`` on the first bad field: the sizes against the world, E and the
        tokens of an image (``tokens``, when given) through ``ParallelDims``, then the DICE and SP
        knobs (every sampler drives the same step schedule, so none restricts anything)."""
        ParallelDims(world_size, self.ep_size, self.sp_size).validate(num_experts=num_experts,
                                                                      tokens=tokens)
        if self.mode not in EP_MODES:
            raise ConfigError(f"mode={self.mode!r}: use {', '.join(EP_MODES)}")
        if self.mode != "sync" and not self.ep_enabled:
            raise ConfigError(
                f"mode={self.mode!r} (--ep-async) needs expert parallelism: pass --ep with a world "
                "size > 1 (displaced EP runs on an expert-parallel group)"
            )
        if isinstance(self.async_layers, str):
            if self.async_layers not in ASYNC_LAYER_SETS:
                raise ConfigError(
                    f"async_layers={self.async_layers!r} (--ep-async-mode): use "
                    f"{', '.join(ASYNC_LAYER_SETS)} or a comma-separated list of layer indices"
                )
        else:
            bad = [layer for layer in self.async_layers if not 0 <= layer < depth]
            if bad or not self.async_layers:
                raise ConfigError(
                    f"async_layers={self.async_layers}: layer indices must be in [0, {depth})"
                )
        for name in ("warmup", "cooldown", "strided", "sp_warmup"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.stale_output_weights not in STALE_WEIGHTS:
            raise ConfigError(f"stale_output_weights must be one of {', '.join(STALE_WEIGHTS)}")
        if self.skip_period < 1:
            raise ConfigError(f"skip_period={self.skip_period} (--ep-async-noskip-step) must be >= 1")
        if self.skip_period > 1 and self.skip_strategy is None:
            raise ConfigError(
                "skip_period > 1 (--ep-async-noskip-step) needs skip_strategy "
                f"(--ep-async-skip-strategy {'|'.join(SKIP_STRATEGIES)})"
            )
        if self.skip_period > 1 and not self.ep_enabled:
            raise ConfigError("conditional communication (--ep-async-noskip-step > 1) needs --ep")
        if self.skip_strategy not in (None, *SKIP_STRATEGIES):
            raise ConfigError(f"skip_strategy={self.skip_strategy!r}: use "
                              f"{', '.join(SKIP_STRATEGIES)}")
        if self.payload_dtype not in (None, *DTYPES):
            raise ConfigError(f"payload_dtype={self.payload_dtype!r}: use {', '.join(DTYPES)}")
        if self.payload_dtype is not None and not self.ep_enabled:
            raise ConfigError("payload_dtype (--a2a-dtype) is the dtype of the expert-parallel "
                              "all-to-all and does nothing without it: pass --ep with a world "
                              "size > 1, or drop it")
        if self.ep_overlap and not self.ep_enabled:
            raise ConfigError("ep_overlap (--ep-overlap) overlaps the expert-parallel all-to-all "
                              "and does nothing without it: pass --ep with a world size > 1, or "
                              "drop it")
        if self.sp_warmup and not self.sp_async:
            raise ConfigError("sp_warmup (--sp-async-warm-up) needs --sp-async")
        if self.sp_async and not self.sp_enabled:
            raise ConfigError("sp_async (--sp-async) needs sequence parallelism: pass --sp with a "
                              "world size > 1 (displaced SP runs on a sequence-parallel group)")
        if self.single_img and not self.sp_enabled:
            raise ConfigError("single_img (--single-img) needs --sp with a world size > 1")
        if self.sp_bucket_layers < 1:
            raise ConfigError(f"sp_bucket_layers={self.sp_bucket_layers} must be >= 1")
        return self
