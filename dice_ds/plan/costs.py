"""Per-layer compute seconds of one rank, for ``dice_ds.plan``.

Owns ``LayerCosts`` (seconds per MoE layer call at mean expert load: attention+rest, router, shared
expert, routed experts, local permute/unpermute) built from FLOPs and a throughput
(``costs_from_flops``) or from the DP row of a ``dice-ds bench`` JSON (``costs_from_phases``).
What a rank computes and the bytes it sends per layer call (``Workload``, ``messages``) are
``dice_ds.workload``'s, shared with the bench.

Conventions: ``dice_ds.workload``'s (N rows per MoE call on one rank, top_k slots per row). SwiGLU
experts cost 6*h*F FLOPs per row (F = expert FFN size).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dice_ds.workload import Workload


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
