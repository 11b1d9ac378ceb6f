"""Exchange records and per-layer staleness state of the DICE expert-parallel runtime.

Owns the data that crosses denoising steps (spec §2.2.2-§2.2.5, §2.5; pitfalls 9, 10, 13):

- ``ExchangeRecord``: the frozen metadata of ONE all-to-all exchange of one MoE layer at one step:
  split sizes, per-expert counts, the permutation mapping, the routing map as dispatched, the slot
  bookkeeping of conditional communication. megatron's dispatcher keeps the same fields on ``self``
  and overwrites them every call; a stale buffer must be unpermuted, sorted and combined with the
  metadata of ITS step, so every buffer travels with its own record (pitfall 13).
- ``Exchange``: one exchange's buffer (received tokens, or combined expert-output rows), the async
  handles still to wait on, the send buffers kept alive until then, and its record.
- ``SlotCache``: a layer's per-slot expert outputs of its last FULL exchange (conditional comm).
- ``LayerState``: per layer, the dispatch and combine exchanges held across steps, the slot cache,
  and ``reset()`` / ``drain()``, which WAIT on every in-flight handle before clearing (pitfall 9).

Invariants: a record is never mutated after creation; an ``Exchange`` slot of a ``LayerState`` is
never overwritten while it holds an unconsumed exchange (``put`` raises instead of dropping it).

Shape legend: T tokens of one layer call on this rank (N·T_img), E experts, R rows (routed slots in
megatron's expert-major permuted order), D hidden, P EP size, L local experts, 2 the top-2 slots
(slot 0 = higher router score, slot 1 = lower).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None entries ignored)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


@dataclass(frozen=True, eq=False)
class RecordExtras:
    """Slot bookkeeping of one layer call (computed by the runtime from the router output)."""

    row_slot_R: Optional[torch.Tensor] = None
    """int8: slot (0 higher score, 1 lower) of each dispatched row, in permuted order."""
    slot_probs_T2: Optional[torch.Tensor] = None
    """fp32: router probability of each token's two slots at this step."""
    skipped_slot_T: Optional[torch.Tensor] = None
    """int64: the slot each token did NOT dispatch (conditional comm); None = full exchange."""


@dataclass(frozen=True, eq=False)
class ExchangeRecord:
    """Frozen metadata of one layer's exchange at one step: what megatron keeps on ``self``."""

    step: int
    layer: int
    hidden_shape: torch.Size
    hidden_shape_before_permute: torch.Size
    routing_map_TE: torch.Tensor
    """bool, as dispatched (skipped slots cleared)."""
    sorted_indices_R: torch.Tensor
    """megatron's ``reversed_local_input_permutation_mapping``: the token of each permuted row."""
    input_splits: Optional[np.ndarray]
    """rows this rank sends to each EP rank (dispatch direction)."""
    output_splits: Optional[np.ndarray]
    """rows this rank receives from each EP rank (dispatch direction)."""
    output_splits_tp: Optional[np.ndarray]
    tokens_per_expert_L: Optional[torch.Tensor]
    """rows each local expert computes (over all source ranks)."""
    num_global_tokens_per_local_expert_PL: Optional[torch.Tensor]
    """rows from each source rank to each local expert (megatron sets it only when L > 1)."""
    num_out_tokens: Any
    extras: RecordExtras = field(default_factory=RecordExtras)

    @property
    def is_full(self) -> bool:
        return self.extras.skipped_slot_T is None

    @property
    def num_rows(self) -> int:
        return int(self.sorted_indices_R.numel())

    def row_weights_R(self, slot_probs_T2: torch.Tensor) -> torch.Tensor:
        """Per-row weight taken from ``slot_probs_T2`` at (row token, row slot)."""
        if self.extras.row_slot_R is None:
            raise RuntimeError(f"record of layer {self.layer} step {self.step} has no slot data")
        return slot_probs_T2[self.sorted_indices_R, self.extras.row_slot_R.long()]

    def tensors(self) -> list:
        e = self.extras
        return [self.routing_map_TE, self.sorted_indices_R, self.tokens_per_expert_L,
                self.num_global_tokens_per_local_expert_PL, e.row_slot_R, e.slot_probs_T2,
                e.skipped_slot_T]

    def nbytes(self) -> int:
        splits = sum(a.nbytes for a in (self.input_splits, self.output_splits,
                                        self.output_splits_tp) if isinstance(a, np.ndarray))
        return tensor_bytes(self.tensors()) + splits


@dataclass(eq=False)
class Exchange:
    """One exchange's buffer + record; ``handles`` non-empty while the all-to-all is in flight."""

    record: ExchangeRecord
    tokens: torch.Tensor
    """received tokens [R', D] (dispatch) or returned expert-output rows [R, D] (combine)."""
    probs: Optional[torch.Tensor] = None
    """received router probs [R'] (dispatch, when sent)."""
    weighted: bool = True
    """combine rows only: True when the experts multiplied the record's router probs in."""
    handles: list = field(default_factory=list)
    send: list = field(default_factory=list)
    """send buffers: gloo/NCCL read them until the handle completes."""
    unpack: Optional[Any] = None
    """set while ``tokens`` is a packed tokens+probs buffer (``dice_ds.moe.payload``): called by
    ``wait()`` to split it into ``tokens`` and ``probs``."""

    @property
    def in_flight(self) -> bool:
        return bool(self.handles)

    def wait(self) -> "Exchange":
        for h in self.handles:
            h.wait()
        self.handles.clear()
        self.send.clear()
        if self.unpack is not None:
            self.tokens, self.probs = self.unpack(self.tokens)
            self.unpack = None
        return self

    def nbytes(self) -> int:
        """Bytes held for this exchange: receive buffers and record (not the send buffers)."""
        return tensor_bytes([self.tokens, self.probs]) + self.record.nbytes()

    def send_nbytes(self) -> int:
        return tensor_bytes(self.send)


@dataclass(eq=False)
class SlotCache:
    """Per-slot expert outputs of a layer's last full exchange (conditional communication)."""

    step: int
    out_T2D: torch.Tensor
    """expert output of each (token, slot), as it came back (weighted by ``used_w_T2``)."""
    used_w_T2: torch.Tensor
    """weight the experts multiplied in (the record's router probs, or 1)."""
    own_w_T2: torch.Tensor
    """router probs of each slot at the step the outputs belong to."""

    @classmethod
    def from_rows(cls, rows_RD: torch.Tensor, record: ExchangeRecord, weighted: bool
                  ) -> "SlotCache":
        e = record.extras
        t = record.hidden_shape_before_permute[0]
        out_T2D = rows_RD.new_zeros((t, 2, rows_RD.shape[-1]))
        out_T2D[record.sorted_indices_R, e.row_slot_R.long()] = rows_RD
        own = e.slot_probs_T2.float()
        used = own if weighted else torch.ones_like(own)
        return cls(step=record.step, out_T2D=out_T2D, used_w_T2=used, own_w_T2=own)

    def fill_TD(self, skipped_slot_T: torch.Tensor,
                target_w_T2: Optional[torch.Tensor]) -> torch.Tensor:
        """Cached output of each token's skipped slot, reweighted to ``target_w_T2``.

        ``target_w_T2`` None keeps the cached step's own weights ('cached' router weights).
        """
        idx_T = torch.arange(skipped_slot_T.numel(), device=skipped_slot_T.device)
        s_T = skipped_slot_T.long()
        out_TD = self.out_T2D[idx_T, s_T]
        target_T = (self.own_w_T2 if target_w_T2 is None else target_w_T2.float())[idx_T, s_T]
        scale_T = target_T / self.used_w_T2[idx_T, s_T]
        return out_TD * scale_T.to(out_TD.dtype).unsqueeze(-1)

    def nbytes(self) -> int:
        return tensor_bytes([self.out_T2D, self.used_w_T2, self.own_w_T2])


class LayerState:
    """Cross-step state of one MoE layer: held exchanges and the slot cache."""

    def __init__(self, layer: int):
        self.layer = layer
        self.dispatch: Optional[Exchange] = None
        """received tokens waiting for expert compute (displaced: next step; interweaved: next
        ring layer)."""
        self.combine: Optional[Exchange] = None
        """expert-output rows of this layer's tokens, waiting for this layer's next call."""
        self.slots: Optional[SlotCache] = None
        self.full_launched = False
        """a full (unskipped) exchange has been launched since reset: skipping may start."""

    def put(self, kind: str, exchange: Exchange) -> None:
        """Store ``exchange`` in slot ``kind`` ('dispatch' | 'combine'); never drops one."""
        if getattr(self, kind) is not None:
            old = getattr(self, kind)
            raise RuntimeError(
                f"layer {self.layer}: {kind} slot still holds the unconsumed exchange of step "
                f"{old.record.step}; refusing to drop it (storing step {exchange.record.step})")
        setattr(self, kind, exchange)

    def take(self, kind: str) -> Exchange:
        exchange = getattr(self, kind)
        if exchange is None:
            raise RuntimeError(
                f"layer {self.layer}: no {kind} exchange to consume; an async step must follow a "
                "sync step of the same batch (the first step of a batch is always sync: call "
                "runtime.begin_step(i) before every forward of a batch, starting at i = S)")
        setattr(self, kind, None)
        return exchange

    def exchanges(self) -> list[Exchange]:
        return [x for x in (self.dispatch, self.combine) if x is not None]

    def drain(self) -> int:
        """Wait on every in-flight exchange, then drop the exchanges. Returns handles waited."""
        waited = 0
        for x in self.exchanges():
            waited += len(x.handles)
            x.wait()
        self.dispatch = self.combine = None
        return waited

    def reset(self) -> int:
        """``drain()`` plus the slot cache and the skip flag (start of a batch)."""
        waited = self.drain()
        self.slots = None
        self.full_launched = False
        return waited

    def inflight_handles(self) -> int:
        return sum(len(x.handles) for x in self.exchanges())

    def nbytes(self) -> int:
        return sum(x.nbytes() for x in self.exchanges())
