"""Per-layer compute seconds and per-layer message bytes of one rank, for ``dice_ds.plan``.

Owns ``Workload`` (what one rank runs: model config, images per rank, CFG, steps, dtypes),
``LayerCosts`` (seconds per MoE layer call at mean expert load: attention+rest, router, shared
expert, routed experts, local permute/unpermute) built from FLOPs and a throughput
(``costs_from_flops``) or from the DP row of a ``dice-ds bench`` JSON (``costs_from_phases``), and
``Messages`` (bytes a rank sends off-rank per layer call: dispatch, combine, counts; K/V and x
for sequence parallelism).

Conventions: N = model rows per MoE call on one rank = images per rank x (2 with CFG) x tokens;
each row has top_k slots; with W ranks a uniform router sends (W-1)/W of a rank's slots to other
ranks. A dispatch row carries the hidden vector and its fp32 router prob packed as extra columns
(``dice_ds.moe.payload``: 1 column at 4-byte elements, 2 at 2-byte ones); a combine row the
hidden vector. SwiGLU experts cost 6*h*F FLOPs per row (F = expert FFN size).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dice_ds.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Workload:
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


@dataclass(frozen=True)
class LayerCosts:
    """Seconds of one layer call on one rank (mean load, no skipping)."""

    attn: float
    """attention, adaLN, norms and the layer's share of embed/final layer/sampler."""
    router: float
    """router + megatron's local preprocess (routing map, first permutation)."""
    shared: float
    experts: float
    post: float
    """sort/unsort, unpermute, the shared-expert add."""

    @property
    def total(self) -> float:
        return self.attn + self.router + self.shared + self.experts + self.post

    def scaled(self, f: float) -> "LayerCosts":
        return replace(self, attn=self.attn * f, router=self.router * f, shared=self.shared * f,
                       experts=self.experts * f, post=self.post * f)


def layer_flops(w: Workload) -> dict[str, float]:
    """FLOPs of one layer call on one rank, by part (multiply-add = 2 FLOPs)."""
    c, n, t = w.cfg, w.rows, w.tokens_per_image
    h, k = c.hidden_size, c.top_k
    batch = n // t
    return {
        "attn": 2 * n * 4 * h * h + 4 * n * t * h + 2 * batch * h * 6 * h,
        "router": 2 * n * h * c.num_experts,
        "shared": 6 * n * h * c.shared_ffn_size,
        "experts": 6 * n * k * h * c.expert_ffn_size,
        "post": 0.0,
    }


def costs_from_flops(w: Workload, flops_per_s: float) -> LayerCosts:
    """Compute time at ``flops_per_s`` sustained (peak x efficiency, ``dice_ds.plan.presets``)."""
    f = layer_flops(w)
    return LayerCosts(**{key: v / flops_per_s for key, v in f.items()})


def costs_from_phases(dp_row: dict, depth: int, steps: int) -> LayerCosts:
    """Per-layer seconds from the DP row of a bench JSON (rank 0's phases summed over the run).

    The DP run has no exchange: everything outside the MoE phases (attention, adaLN, sampler) is
    ``seconds - sum(phases)``, spread evenly over the S x L layer calls."""
    ph = dp_row["phases"]
    calls = depth * steps
    moe = sum(ph.values())
    local = ph.get("dispatch", 0) + ph.get("combine", 0) + ph.get("postprocess", 0)
    return LayerCosts(attn=max(0.0, dp_row["seconds"] - moe) / calls,
                      router=(ph.get("router", 0) + ph.get("preprocess", 0)) / calls,
                      shared=ph.get("shared", 0) / calls, experts=ph.get("experts", 0) / calls,
                      post=local / calls)


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
