"""Per-rank memory of a mode, for ``dice-ds plan``: weights, activations, stale caches, K/V.

Owns the byte formulas (caches checked against the bench's measured ``ep_cache_peak_bytes`` in
docs/plan.md; weights and activations against measured peaks in docs/scale.md). N rows per rank
and layer, k slots, h hidden, F expert FFN, F_s shared FFN, b payload bytes, c prob columns:

- routed expert weights: L x (E / ep + r) x 3 h F x act bytes (all E without EP; r: the extra
  slots per rank of an expert placement with replicas, dice_ds/placement.py);
- dense weights: everything else (attention, adaLN, router, shared expert, embeddings, final
  layer; ``dense_params``), replicated on every rank;
- activations: the largest transient of one layer call: the MoE layer's permuted rows and SwiGLU
  intermediates (N k (2h + 2F)) plus the residual stream, modulated input, attention projections
  and shared expert (N (6h + 2 F_s)), at act bytes;
- stale EP: every exchange the schedule says a layer holds (``Schedule.holds``), a dispatch as
  N k rows of h + c, a combine as N k x h (displaced: both per async layer; interweaved: every
  async layer's combine plus the ring tail's dispatch);
- conditional communication: per layer (every layer skips) the slot cache N x 2 x h x act;
- displaced SP: every layer's K/V of the whole sequence (receive, 2 N_sp h per layer with
  N_sp = N x sp) plus this rank's send copy (2 N h), as in docs/design.md.
"""

from __future__ import annotations

from dice_ds.schedule import Schedule
from dice_ds.workload import DTYPE_BYTES, Workload


def dense_params(cfg) -> int:
    """Parameters that every rank holds whole: all but the routed experts (released layout)."""
    h, p = cfg.hidden_size, cfg.patch_size
    attn = 4 * h * h + 4 * h + (4 * cfg.head_dim if cfg.attn_layout == "flash" else 0)
    block = attn + 6 * h * h + 6 * h + cfg.num_experts * h + 3 * h * cfg.shared_ffn_size
    top = (p * p * cfg.in_channels * h + h) + (256 * h + h + h * h + h) \
        + (cfg.num_classes + 1) * h + cfg.num_tokens * h \
        + (2 * h * h + 2 * h) + (h * p * p * cfg.out_channels + p * p * cfg.out_channels)
    return cfg.depth * block + top


def expert_params(cfg, ep: int, replicas: int = 0) -> int:
    """Routed-expert parameters one rank holds: its E / ep experts of every layer, plus
    ``replicas`` extra slots per layer (copies of hot experts), 3 matrices each."""
    slots = cfg.num_experts // max(ep, 1) + replicas
    return cfg.depth * slots * 3 * cfg.hidden_size * cfg.expert_ffn_size


def activation_bytes(w: Workload, sp: int = 1) -> float:
    """Largest transient of one layer call on one rank (module doc); SP splits the tokens."""
    c = w.cfg
    n = w.rows / max(sp, 1)
    h, k = c.hidden_size, c.top_k
    return float((n * k * (2 * h + 2 * c.expert_ffn_size) + n * (6 * h + 2 * c.shared_ffn_size))
                 * DTYPE_BYTES[w.dtype])


def memory(w: Workload, sched: Schedule, ep: int, sp: int, payload: str | None,
           replicas: int = 0) -> dict:
    c = w.cfg
    h, k, n, L = c.hidden_size, c.top_k, w.rows, c.depth
    act = DTYPE_BYTES[w.dtype]
    b = DTYPE_BYTES[payload or w.dtype]
    cols = 4 // b
    disp, comb = n * k * (h + cols) * b, n * k * h * b
    held = [sched.holds(l) for l in range(sched.depth)]  # the schedule's answer, per layer
    stale = float(sum(x.dispatch * disp + x.combine * comb for x in held))
    skip = n * 2 * h * act * L if sched.skip_steps else 0.0
    kv = (L * 2 * n * sp * h * act + L * 2 * n * h * act) if sched.sp_async else 0.0
    experts = expert_params(c, ep, replicas) * act
    return {"expert_weights": float(experts), "dense_weights": float(dense_params(c) * act),
            "activations": activation_bytes(w, sp), "stale_cache": float(stale),
            "skip_cache": float(skip), "kv_cache": float(kv)}
