"""What one rank of a run computes and sends per MoE layer call: the arithmetic shared by the plan's
cost model (dice_ds/plan), the tuner (dice_ds/tune/cli.py) and the bench, which sizes its SP
all-gather probe by it (dice_ds/bench/cli.py).

Owns ``Workload`` (what one rank runs: model config, images per rank, CFG, steps, dtypes), built
from a run's settings by ``workload_of_settings``, and ``Messages`` (bytes a rank sends off-rank per
layer call: dispatch, combine, counts; K/V and x for sequence parallelism) from ``messages``.
Below both the plan and the bench: it imports neither.

Conventions: N = model rows per MoE call on one rank = images per rank x (2 with CFG) x tokens;
each row has top_k slots; with W ranks a uniform router sends (W-1)/W of a rank's slots to other
ranks. A dispatch row carries the hidden vector and its fp32 router prob packed as extra columns
(``dice_ds.moe.payload``: 1 column at 4-byte elements, 2 at 2-byte ones); a combine row the
hidden vector.
"""

from __future__ import annotations

from dataclasses import dataclass

from dice_ds.config import ModelConfig, get_flavor
from dice_ds.ds_config import Settings
from dice_ds.options import steps_of, tokens_of

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Workload:
    """What one rank runs in a sampling run."""

    cfg: ModelConfig
    images_per_rank: int = 32
    cfg_guidance: bool = True
    steps: int = 50
    dtype: str = "fp16"
    """activation dtype (payload default)."""
    tokens: int | None = None
    """tokens per image (None: the flavor's native size)."""

    @property
    def tokens_per_image(self) -> int:
        return self.tokens if self.tokens is not None else self.cfg.num_tokens

    @property
    def rows(self) -> int:
        """N: rows of one MoE layer call on one rank."""
        return self.images_per_rank * (2 if self.cfg_guidance else 1) * self.tokens_per_image


def workload_of_settings(s: Settings) -> Workload:
    """What a run with these settings computes per rank: the model, images, guidance (a doubled
    batch when ``cfg_scale`` > 1), dtype, steps and tokens of an image."""
    cfg = get_flavor(s.model)
    cfg = cfg.replace(depth=s.depth or cfg.depth, num_experts=s.num_experts or cfg.num_experts)
    return Workload(cfg=cfg, images_per_rank=s.per_proc_batch_size, cfg_guidance=s.cfg_scale > 1,
                    dtype=s.dtype, steps=steps_of(s), tokens=tokens_of(s))


@dataclass(frozen=True)
class Messages:
    """Bytes one rank sends to other ranks per layer call (full rows, mean load)."""

    dispatch: float
    combine: float
    counts: float
    kv: float = 0.0
    """SP: this rank's K/V chunk to every other SP rank (one layer)."""
    x: float = 0.0
    """SP: the final all-gather of x (once per step)."""


def messages(w: Workload, ep: int, sp: int = 1, payload: str | None = None) -> Messages:
    """Message sizes for EP size ``ep`` and SP size ``sp`` (rows per rank as in DP)."""
    c = w.cfg
    h, k, n = c.hidden_size, c.top_k, w.rows
    b = DTYPE_BYTES[payload or w.dtype]
    act = DTYPE_BYTES[w.dtype]
    remote = (ep - 1) / ep
    slots = n * k * remote
    kv = 2 * n * h * act * (sp - 1) if sp > 1 else 0.0
    return Messages(dispatch=slots * (h + 4 // b) * b if ep > 1 else 0.0,
                    combine=slots * h * b if ep > 1 else 0.0,
                    counts=4.0 * c.num_experts if ep > 1 else 0.0,
                    kv=kv, x=n * h * act * (sp - 1) if sp > 1 else 0.0)
