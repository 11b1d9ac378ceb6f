"""DICE's stale all-to-all dispatchers: megatron's ``MoEAlltoAllTokenDispatcher`` with only its
communication replaced (spec §2.2.2, §2.2.3, §2.8; design-notes "Displaced EP on these phases").

Owns ``DisplacedAlltoAllTokenDispatcher`` and ``InterweavedAlltoAllTokenDispatcher`` and the two
helpers that move an ``ExchangeRecord`` in and out of megatron's per-call attributes
(``capture_record`` / ``install_record``).

What is overridden, and only when the runtime marks the call stale (``begin_call(stale=True)``;
otherwise every method is megatron's own, so a sync call IS megatron's all-to-all EP):

- ``preprocess``: the count exchange. megatron all-gathers the per-expert counts and needs them on
  the host before the payload all-to-all (pitfall 8). Here an async ``all_to_all_single`` of the
  [P, L] counts is posted right after routing and waited only when the payload is launched, after
  the expert compute of the stale buffer. The local permutation (megatron's) is unchanged.
- ``token_dispatch``: remembers this call's permuted tokens (launched later), waits on the SOURCE
  layer's dispatch exchange and puts its record in place, so megatron's ``dispatch_postprocess`` /
  ``combine_preprocess`` sort the received rows with the metadata of the step they belong to.
- ``token_combine``: launches the async combine of the rows just computed (with the source record),
  launches this call's own async dispatch, waits on this layer's own combine exchange and puts ITS
  record in place for megatron's ``combine_postprocess`` (pitfall 13).

The two modes differ in two facts only: where the expert input comes from (displaced: this layer's
dispatch of the previous step; interweaved: the ring predecessor's dispatch of this step, so the
runtime computes the predecessor's experts) and when this layer's own combine is taken (displaced:
before launching the new one -> 2 steps stale; interweaved: the one its ring successor launched
last step -> 1 step stale; with a ring of one layer the just-launched combine is waited at once).

gloo: ``all_to_all_single`` with list splits and ``async_op=True`` only (megatron-on-cpu.md §4).
Payload dtype casts are the runtime's; this module sends what it is given. Router probs travel in
their own (fp32) all-to-all next to the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from dice_ds.moe.profile import CommLedger, PhaseTimer
from dice_ds.moe.records import Exchange, ExchangeRecord, LayerState, RecordExtras


def _as_numpy(splits) -> Optional[np.ndarray]:
    if splits is None or isinstance(splits, np.ndarray):
        return splits
    return torch.as_tensor(splits).cpu().numpy()


def capture_record(disp: MoEAlltoAllTokenDispatcher, *, step: int, layer: int,
                   extras: RecordExtras = RecordExtras()) -> ExchangeRecord:
    """Freeze megatron's per-call attributes after ``token_dispatch`` (sync path)."""
    ngtple = disp.num_global_tokens_per_local_expert if disp.num_local_experts > 1 else None
    return ExchangeRecord(
        step=step, layer=layer, hidden_shape=disp.hidden_shape,
        hidden_shape_before_permute=disp.hidden_shape_before_permute,
        routing_map_TE=disp.routing_map,
        sorted_indices_R=disp.reversed_local_input_permutation_mapping,
        input_splits=_as_numpy(disp.input_splits), output_splits=_as_numpy(disp.output_splits),
        output_splits_tp=_as_numpy(disp.output_splits_tp),
        tokens_per_expert_L=disp.tokens_per_expert, num_global_tokens_per_local_expert_PL=ngtple,
        num_out_tokens=disp.num_out_tokens, extras=extras)


def install_record(disp: MoEAlltoAllTokenDispatcher, rec: ExchangeRecord) -> None:
    """Put ``rec`` in place of megatron's per-call attributes (before the local phases)."""
    disp.hidden_shape = rec.hidden_shape
    disp.hidden_shape_before_permute = rec.hidden_shape_before_permute
    disp.routing_map = rec.routing_map_TE
    disp.reversed_local_input_permutation_mapping = rec.sorted_indices_R
    disp.input_splits = rec.input_splits
    disp.output_splits = rec.output_splits
    disp.output_splits_tp = rec.output_splits_tp
    disp.tokens_per_expert = rec.tokens_per_expert_L
    disp.num_out_tokens = rec.num_out_tokens
    if rec.num_global_tokens_per_local_expert_PL is not None:
        disp.num_global_tokens_per_local_expert = rec.num_global_tokens_per_local_expert_PL


@dataclass(eq=False)
class _PendingDispatch:
    """This call's permuted tokens and local metadata, launched once the counts have arrived."""

    tokens_RD: torch.Tensor
    probs_R: torch.Tensor
    hidden_shape: torch.Size
    hidden_shape_before_permute: torch.Size
    routing_map_TE: torch.Tensor
    sorted_indices_R: torch.Tensor
    send_PL: torch.Tensor
    recv_PL: torch.Tensor
    counts_handle: object
    extras: RecordExtras


class StaleAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher whose stale calls exchange across steps (base class)."""

    take_own_combine_first: bool = True
    """Take this layer's own combine before launching the source's (False only matters when the
    source is this layer itself: then the just-launched combine is the one returned)."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection, *,
                 layer: int, state: LayerState, source_state: LayerState, ledger: CommLedger,
                 timer: PhaseTimer, on_store: Callable[[], None]):
        super().__init__(num_local_experts, local_expert_indices, config=config,
                         pg_collection=pg_collection)
        self.layer = layer
        self.state = state
        self.source_state = source_state
        self.ledger = ledger
        self.timer = timer
        self.on_store = on_store
        self.stale = False
        self.step: Optional[int] = None
        self.extras = RecordExtras()
        self.experts_weighted = True
        self.installed: Optional[ExchangeRecord] = None
        self.returned: Optional[Exchange] = None
        self._counts = None
        self._pending: Optional[_PendingDispatch] = None

    def begin_call(self, *, stale: bool, step: Optional[int], experts_weighted: bool = True,
                   extras: RecordExtras = RecordExtras()) -> None:
        """Set by the runtime before each layer call (the step is an argument, never counted)."""
        if self._pending is not None or self._counts is not None:
            raise RuntimeError(f"layer {self.layer}: previous stale call did not finish")
        self.stale, self.step, self.experts_weighted = stale, step, experts_weighted
        self.extras = extras
        self.installed = self.returned = None

    def abort_call(self) -> None:
        """Forget a call that did not finish (an exception mid-forward): wait, then drop."""
        if self._counts is not None:
            self._counts[2].wait()
        if self._pending is not None:
            self._pending.counts_handle.wait()
        self._counts = self._pending = None

    # -- count exchange (inside megatron's dispatch_preprocess) ------------------------------
    def preprocess(self, routing_map: torch.Tensor):
        if not self.stale:
            return super().preprocess(routing_map)
        counts_E = routing_map.sum(dim=0).long()  # length E by construction (pitfall 16)
        send_PL = counts_E.view(self.ep_size, self.num_local_experts).contiguous()
        recv_PL = torch.empty_like(send_PL)
        handle = dist.all_to_all_single(recv_PL, send_PL, group=self.ep_group, async_op=True)
        self._counts = (send_PL, recv_PL, handle)
        self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk
        self.input_splits = self.output_splits = self.output_splits_tp = None
        return None

    # -- dispatch ------------------------------------------------------------------------------
    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        if not self.stale:
            return super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        send_PL, recv_PL, handle = self._counts
        self._counts = None
        self._pending = _PendingDispatch(
            tokens_RD=permutated_local_input_tokens, probs_R=permuted_probs,
            hidden_shape=self.hidden_shape,
            hidden_shape_before_permute=self.hidden_shape_before_permute,
            routing_map_TE=self.routing_map,
            sorted_indices_R=self.reversed_local_input_permutation_mapping,
            send_PL=send_PL, recv_PL=recv_PL, counts_handle=handle, extras=self.extras)
        source = self.source_state.take("dispatch")
        with self.timer.phase("wait_dispatch"):
            source.wait()
        install_record(self, source.record)
        self.installed = source.record
        return source.tokens, source.probs

    # -- combine -------------------------------------------------------------------------------
    def token_combine(self, hidden_states, async_finish=True, allocate_on_comm_stream=True):
        if not self.stale:
            return super().token_combine(hidden_states)
        # taking a slot only moves the exchange out of the held state; its wait comes last
        take_first = self.take_own_combine_first or self.source_state is not self.state
        own = self.state.take("combine") if take_first else None
        computed = self.installed
        self.source_state.put("combine", self._launch(
            "combine", hidden_states, None, send=computed.output_splits,
            recv=computed.input_splits, record=computed, weighted=self.experts_weighted))
        self.state.put("dispatch", self._launch_own_dispatch())
        self.on_store()
        if own is None:
            own = self.state.take("combine")
        with self.timer.phase("wait_combine"):
            own.wait()
        install_record(self, own.record)
        self.installed, self.returned = own.record, own
        return own.tokens

    def _launch_own_dispatch(self) -> Exchange:
        p, self._pending = self._pending, None
        with self.timer.phase("wait_counts"):
            p.counts_handle.wait()
        recv_PL = p.recv_PL
        record = ExchangeRecord(
            step=self.step, layer=self.layer, hidden_shape=p.hidden_shape,
            hidden_shape_before_permute=p.hidden_shape_before_permute,
            routing_map_TE=p.routing_map_TE, sorted_indices_R=p.sorted_indices_R,
            input_splits=p.send_PL.sum(dim=1).cpu().numpy(),
            output_splits=recv_PL.sum(dim=1).cpu().numpy(),
            output_splits_tp=np.array([int(recv_PL.sum())]),
            tokens_per_expert_L=recv_PL.sum(dim=0),
            num_global_tokens_per_local_expert_PL=recv_PL if self.num_local_experts > 1 else None,
            num_out_tokens=int(p.sorted_indices_R.numel()), extras=p.extras)
        return self._launch("dispatch", p.tokens_RD, p.probs_R, send=record.input_splits,
                            recv=record.output_splits, record=record)

    def _launch(self, kind: str, payload_RD, probs_R, *, send, recv, record: ExchangeRecord,
                weighted: bool = True) -> Exchange:
        """Post the async all-to-all(s) of one exchange; the buffers travel with ``record``."""
        send_l, recv_l = [int(x) for x in send], [int(x) for x in recv]
        payload_RD = payload_RD.contiguous()
        recv_RD = payload_RD.new_empty((sum(recv_l), *payload_RD.shape[1:]))
        handles = [dist.all_to_all_single(recv_RD, payload_RD, recv_l, send_l,
                                          group=self.ep_group, async_op=True)]
        sends, recv_probs, prob_bytes = [payload_RD], None, 0
        if probs_R is not None:
            probs_R = probs_R.contiguous()
            recv_probs = probs_R.new_empty((sum(recv_l), *probs_R.shape[1:]))
            handles.append(dist.all_to_all_single(recv_probs, probs_R, recv_l, send_l,
                                                  group=self.ep_group, async_op=True))
            sends.append(probs_R)
            prob_bytes = probs_R.numel() * probs_R.element_size()
        me = self.ep_group.rank()
        row_bytes = payload_RD[0].numel() * payload_RD.element_size() if len(payload_RD) else 0
        self.ledger.sent(step=self.step, layer=record.layer, kind=kind, rows=sum(send_l),
                         token_bytes=payload_RD.numel() * payload_RD.element_size(),
                         prob_bytes=prob_bytes, remote_rows=sum(send_l) - send_l[me],
                         row_bytes=row_bytes)
        return Exchange(record=record, tokens=recv_RD, probs=recv_probs, weighted=weighted,
                        handles=handles, send=sends)


class DisplacedAlltoAllTokenDispatcher(StaleAlltoAllTokenDispatcher):
    """Displaced EP: compute last step's received tokens; return the combine launched last step
    (2 steps stale; 1 right after a sync step)."""

    take_own_combine_first = True

    @staticmethod
    def keeps_after_sync(is_ring_tail: bool) -> tuple[bool, bool]:
        """(dispatch, combine): which fresh exchanges a sync call must leave for the next step."""
        return True, True


class InterweavedAlltoAllTokenDispatcher(StaleAlltoAllTokenDispatcher):
    """Interweaved EP: compute the ring predecessor's tokens of this step; own outputs come back
    one step later (1 step stale at every async layer)."""

    take_own_combine_first = False

    @staticmethod
    def keeps_after_sync(is_ring_tail: bool) -> tuple[bool, bool]:
        # The ring tail's dispatch crosses the step boundary (the ring head consumes it). Every
        # other layer reads its combine slot before its ring successor writes it, so it needs the
        # sync step's rows; the tail's slot is written by the head (which runs first) instead.
        return is_ring_tail, not is_ring_tail


DISPATCHERS = {"displaced": DisplacedAlltoAllTokenDispatcher,
               "interweaved": InterweavedAlltoAllTokenDispatcher}
