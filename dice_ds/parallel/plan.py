"""The parallel plan: plain data saying how a DiT-MoE is parallelised for sampling.

Owns ``ParallelPlan`` (expert-parallel size, DICE mode and every DICE knob) and its validation.
Building a plan is inert; ``validate()`` raises ``ConfigError`` naming the field (and CLI flag) and
the fix, before any process group starts. ``dice_ds.parallel.apply.parallelize_dit_moe`` turns a
plan into a runtime.

Conventions: the sampler's step index i counts *down* from S to 1 (rev = S − i, rev 0 is the first
step). ``async_layers`` names the MoE layers that run asynchronously (the reference's
``--ep-async-mode`` convention); every other layer stays synchronous.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Union

from dice_ds.config import ConfigError

EPMode = Literal["sync", "displaced", "interweaved"]
AsyncLayers = Union[Literal["all", "shallow", "deep", "interleaved"], tuple[int, ...]]


@dataclass(frozen=True)
class ParallelPlan:
    """How to parallelise one sampling run."""

    ep_size: int = 1
    """Expert-parallel group size (1: no EP, pure data parallelism). Must divide the world size and
    the expert count. EP groups are contiguous ranks; the rest of the world is data parallel."""
    mode: EPMode = "sync"
    """'sync': megatron's all-to-all dispatcher. 'displaced': DICE displaced EP (2-step-stale expert
    outputs). 'interweaved': DICE interweaved EP (1-step staleness, half the cache)."""
    async_layers: AsyncLayers = "shallow"
    """Which MoE layers run async (others stay sync): 'all'; 'shallow' = l < L/2 (DICE's choice,
    the paper's "deep sync"); 'deep' = l >= L/2; 'interleaved' = even l; or explicit indices."""
    warmup: int = 0
    """Steps rev = 0..warmup are synchronous (warmup + 1 sync steps; the first is always sync)."""
    cooldown: int = 0
    """The last ``cooldown`` steps (i <= cooldown) are synchronous. Works on its own."""
    strided: int = 0
    """Every step with i % strided == 0 is synchronous (0: off)."""
    stale_output_weights: Literal["cached", "current"] = "cached"
    """Router weights multiplying a stale expert output: 'cached' = the weights of the step the
    output came from (consistent; default); 'current' = this step's top-k weights, slot by slot."""
    skip_period: int = 1
    """Conditional communication: slots are skipped on steps with i % skip_period != 0 (1: off)."""
    skip_strategy: Literal["low", "high", "rand"] | None = None
    """Which of a token's two slots is skipped: 'low' (lower router score), 'high', 'rand'."""
    skip_seed: int = 0
    """Seed of the 'rand' strategy's generator (reset with the other per-run state)."""
    payload_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """dtype of the all-to-all payload (None: the activation dtype). bf16/fp16 halve the bytes."""

    def replace(self, **changes) -> "ParallelPlan":
        return dataclasses.replace(self, **changes)

    @property
    def ep_enabled(self) -> bool:
        return self.ep_size > 1

    @property
    def async_enabled(self) -> bool:
        return self.ep_enabled and self.mode != "sync"

    def validate(self, *, world_size: int, num_experts: int, depth: int,
                 sampler: str = "rf") -> "ParallelPlan":
        """Raise ``ConfigError`` on the first bad field. ``sampler`` does not restrict anything:
        every sampler drives the same step schedule through ``runtime.begin_step`` (pitfall 6)."""
        if self.ep_size < 1 or world_size % self.ep_size:
            raise ConfigError(
                f"ep_size={self.ep_size} (--ep-size) must divide the world size {world_size}"
            )
        if num_experts % self.ep_size:
            raise ConfigError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size "
                f"{self.ep_size} (--ep-size): pick an EP size that divides {num_experts}"
            )
        if self.mode not in ("sync", "displaced", "interweaved"):
            raise ConfigError(f"mode={self.mode!r}: use sync, displaced or interweaved")
        if self.mode != "sync" and not self.ep_enabled:
            raise ConfigError(
                f"mode={self.mode!r} (--ep-async) needs expert parallelism: pass --ep with a world "
                "size > 1"
            )
        if isinstance(self.async_layers, str):
            if self.async_layers not in ("all", "shallow", "deep", "interleaved"):
                raise ConfigError(
                    f"async_layers={self.async_layers!r} (--ep-async-mode): use all, shallow, deep, "
                    "interleaved or a comma-separated list of layer indices"
                )
        else:
            bad = [layer for layer in self.async_layers if not 0 <= layer < depth]
            if bad or not self.async_layers:
                raise ConfigError(
                    f"async_layers={self.async_layers}: layer indices must be in [0, {depth})"
                )
        for name in ("warmup", "cooldown", "strided"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.stale_output_weights not in ("cached", "current"):
            raise ConfigError("stale_output_weights must be 'cached' or 'current'")
        if self.skip_period < 1:
            raise ConfigError(f"skip_period={self.skip_period} (--ep-async-noskip-step) must be >= 1")
        if self.skip_period > 1 and self.skip_strategy is None:
            raise ConfigError(
                "skip_period > 1 (--ep-async-noskip-step) needs skip_strategy "
                "(--ep-async-skip-strategy low|high|rand)"
            )
        if self.skip_period > 1 and not self.ep_enabled:
            raise ConfigError("conditional communication (--ep-async-noskip-step > 1) needs --ep")
        if self.skip_strategy not in (None, "low", "high", "rand"):
            raise ConfigError(f"skip_strategy={self.skip_strategy!r}: use low, high or rand")
        if self.payload_dtype not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"payload_dtype={self.payload_dtype!r}: use fp32, bf16 or fp16")
        return self
