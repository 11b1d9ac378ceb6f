"""Per-GPU memory a mode adds, for ``dice-ds plan``: expert weights, stale caches, displaced-SP K/V.

Owns the byte formulas (checked against the bench's measured ``ep_cache_peak_bytes`` in
docs/plan.md). N rows per rank and layer, k slots, h hidden, b payload bytes, c prob columns:

- routed expert weights: L x (E / ep) x 3 h F x act bytes (all E without EP);
- displaced EP: per async layer the held dispatch (N k rows of h + c) and combine (N k x h);
- interweaved EP: per async layer the held combine, plus the ring tail's dispatch;
- conditional communication: per layer (every layer skips) the slot cache N x 2 x h x act;
- displaced SP: every layer's K/V of the whole sequence (receive, 2 N_sp h per layer with
  N_sp = N x sp) plus this rank's send copy (2 N h), as in docs/design.md.
"""

from __future__ import annotations

from dice_ds.plan.costs import DTYPE_BYTES, Workload
from dice_ds.schedule import Schedule


def memory(w: Workload, sched: Schedule, ep: int, sp: int, payload: str | None) -> dict:
    c = w.cfg
    h, k, n, L = c.hidden_size, c.top_k, w.rows, c.depth
    act = DTYPE_BYTES[w.dtype]
    b = DTYPE_BYTES[payload or w.dtype]
    cols = 4 // b
    disp, comb = n * k * (h + cols) * b, n * k * h * b
    a = len(sched.async_layers)
    stale = 0.0
    if a and sched.ep_mode == "displaced":
        stale = a * (disp + comb)
    elif a and sched.ep_mode == "interweaved":
        stale = a * comb + disp
    skip = n * 2 * h * act * L if sched.skip_steps else 0.0
    kv = (L * 2 * n * sp * h * act + L * 2 * n * h * act) if sched.sp_async else 0.0
    experts = L * (c.num_experts // max(ep, 1)) * 3 * h * c.expert_ffn_size * act
    return {"expert_weights": float(experts), "stale_cache": float(stale),
            "skip_cache": float(skip), "kv_cache": float(kv)}
