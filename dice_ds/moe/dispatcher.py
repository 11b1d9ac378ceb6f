"""DICE's all-to-all dispatchers: megatron's ``MoEAlltoAllTokenDispatcher`` with only its
communication replaced (docs/spec.md §2.2.2, §2.2.3, §2.8; docs/design.md "Exchange schedule").

Owns ``PackedAlltoAllTokenDispatcher`` (every EP layer: a dispatch is one message of tokens + probs),
``StaleAlltoAllTokenDispatcher`` (async layers, both stale modes), the
``CombineOutbox`` that orders stale combines behind dispatches, and the two helpers that move an
``ExchangeRecord`` in and out of megatron's per-call attributes (``capture_record`` /
``install_record``).

What the stale dispatchers override, and only when the runtime hands over a stale call
(``begin_call(call)`` with the schedule's ``Call``; otherwise a call is megatron's phases with the
packed dispatch):

- ``preprocess``: the count exchange. megatron all-gathers the per-expert counts and needs them on
  the host before the payload all-to-all (pitfall 8). Here an async ``all_to_all_single`` of the
  [P, L] counts is posted right after routing, on its own group. The local permutation (megatron's)
  is unchanged.
- ``token_dispatch``: takes the SOURCE layer's dispatch exchange, posts this call's own dispatch
  if its counts have landed (polled), waits on the source and puts its record in place, so
  megatron's ``dispatch_postprocess`` / ``combine_preprocess`` sort the received rows with the
  metadata of the step they belong to.
- ``token_combine``: posts the own dispatch if still pending, defers the combine of the rows just
  computed (with the source record) to the outbox, waits on this layer's own combine exchange and
  puts ITS record in place for megatron's ``combine_postprocess`` (pitfall 13).

The two stale modes differ in two facts only, and both are the schedule's answers
(``dice_ds.schedule.Schedule.call``), never decided here: where the expert input comes from (the
``source_state`` the runtime hands over: this layer's for displaced, the ring predecessor's for
interweaved) and which combine is returned (``Call.own_work``: the held one, taken before this
call's combine is posted, or, for a ring of one, the one this call posts and then waits on).

gloo: ``all_to_all_single`` with list splits and ``async_op=True`` only (docs/megatron-cpu.md §4).
Payload dtype casts are the runtime's; this module sends what it is given. Router probs keep fp32:
their bits ride in the packed message (``dice_ds.moe.payload``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from dice_ds.mcore import MoEAlltoAllTokenDispatcher  # imports megatron (dice_ds/mcore/__init__.py)
from dice_ds.moe.payload import CountsExchange, pack_rows, unpack_rows
from dice_ds.moe.profile import CommLedger, PhaseTimer
from dice_ds.moe.records import Exchange, ExchangeRecord, LayerState, RecordExtras
from dice_ds.schedule import Call


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
    counts: CountsExchange
    extras: RecordExtras


class CombineOutbox:
    """Combines waiting to be posted until the next own dispatch has gone out (one per runtime).

    A combine is needed one step later, a dispatch within one layer; on a shared link whatever is
    posted first goes first, so a stale call defers its combine here and the next stale call posts
    it right AFTER its own dispatch. Every rank flushes at the same points of its program (after an
    own dispatch, before any sync call, step boundary, drain or reset), so all ranks post the same
    collectives in the same order on each group.
    """

    def __init__(self):
        self._pending: list[Callable[[], None]] = []

    def defer(self, post: Callable[[], None]) -> None:
        self._pending.append(post)

    def flush(self) -> None:
        posted, self._pending = self._pending, []
        for post in posted:
            post()


class PackedAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher with its exchanges replaced, local phases kept.

    - ``preprocess``: the per-(rank, local expert) counts go by ONE ``all_to_all_single`` of a
      [P, L] matrix (``counts_group``) instead of megatron's all-gather of every rank's [E] counts
      (a ring of P - 1 rounds on gloo); the split sizes and per-expert counts it derives are the
      same integers, so outputs are bitwise megatron's (docs/benchmarks.md "Sync EP's exchange");
    - ``token_dispatch``: tokens and probs as ONE message (``dice_ds.moe.payload``, bit-exact);
    - ``token_combine``: one plain ``all_to_all_single`` of the expert-output rows.
    Overlapped sync calls (``dice_ds.schedule.Call.overlap``) use the same exchanges in pieces:
    ``stage_counts`` makes ``preprocess`` post its count exchange and return, ``stage`` keeps one
    micro-batch's permuted rows and megatron's per-call attributes, ``post_dispatch`` /
    ``post_combine`` post a micro-batch's exchanges without waiting (``Exchange``).
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection, *,
                 counts_group=None):
        super().__init__(num_local_experts, local_expert_indices, config=config,
                         pg_collection=pg_collection)
        self.counts_group = counts_group if counts_group is not None else self.ep_group
        self.stage_counts = False
        """While True, ``preprocess`` posts the count exchange and leaves the splits unset."""
        self._counts: Optional[CountsExchange] = None

    # -- count exchange (inside megatron's dispatch_preprocess) --------------------------------
    def preprocess(self, routing_map: torch.Tensor):
        if self.ep_size == 1 or self.tp_size > 1:
            return super().preprocess(routing_map)
        counts_E = routing_map.sum(dim=0).long()  # length E by construction (pitfall 16)
        counts = CountsExchange(counts_E.view(self.ep_size, self.num_local_experts),
                                self.counts_group)
        self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk
        if self._posts_counts():
            self._counts = counts
            self.input_splits = self.output_splits = self.output_splits_tp = None
            return None
        sp = splits_of(counts.wait(), self.num_local_experts)
        self.input_splits, self.output_splits = sp["input_splits"], sp["output_splits"]
        self.output_splits_tp = sp["output_splits_tp"]
        if sp["num_global_tokens_per_local_expert_PL"] is not None:
            self.num_global_tokens_per_local_expert = sp["num_global_tokens_per_local_expert_PL"]
        return sp["tokens_per_expert_L"]

    def _posts_counts(self) -> bool:
        """Whether this call's count exchange is posted and left in flight (``_counts``)."""
        return self.stage_counts

    # -- exchanges -----------------------------------------------------------------------------
    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        if self.ep_size == 1:
            return super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_ep_alltoall", self.tokens_per_expert)
        send_l = [int(x) for x in self.input_splits]
        recv_l = [int(x) for x in self.output_splits]
        packed = pack_rows(permutated_local_input_tokens, permuted_probs)
        recv = packed.new_empty((sum(recv_l), packed.shape[1]))
        dist.all_to_all_single(recv, packed, recv_l, send_l, group=self.ep_group)
        tokens_RD, probs_R = unpack_rows(recv)
        return tokens_RD, probs_R.to(permuted_probs.dtype)

    def token_combine(self, hidden_states, async_finish=True, allocate_on_comm_stream=True):
        if self.ep_size == 1 or self.tp_size > 1:
            return super().token_combine(hidden_states)
        send_l = [int(x) for x in self.output_splits]
        recv_l = [int(x) for x in self.input_splits]
        hidden_states = hidden_states.contiguous()
        out = hidden_states.new_empty((sum(recv_l), *hidden_states.shape[1:]))
        dist.all_to_all_single(out, hidden_states, recv_l, send_l, group=self.ep_group)
        return out

    # -- overlapped sync calls: one micro-batch at a time ------------------------------------
    def stage(self, tokens_RD: torch.Tensor, probs_R: torch.Tensor,
              extras: RecordExtras = RecordExtras()) -> "_PendingDispatch":
        """After ``preprocess`` with ``stage_counts``: this micro-batch's rows, megatron's
        per-call attributes and its posted counts, to post with ``post_dispatch``."""
        counts, self._counts = self._counts, None
        if counts is None:
            raise RuntimeError("stage() needs a preprocess with stage_counts set just before")
        return _PendingDispatch(
            tokens_RD=tokens_RD, probs_R=probs_R, hidden_shape=self.hidden_shape,
            hidden_shape_before_permute=self.hidden_shape_before_permute,
            routing_map_TE=self.routing_map,
            sorted_indices_R=self.reversed_local_input_permutation_mapping,
            counts=counts, extras=extras)

    def post_dispatch(self, p: "_PendingDispatch", *, step: int, layer: int) -> Exchange:
        """Wait for ``p``'s counts, post its dispatch (tokens + probs, one message)."""
        p.counts.wait()
        record = record_of(p, step=step, layer=layer, num_local_experts=self.num_local_experts)
        return post_exchange(p.tokens_RD, p.probs_R, send=record.input_splits,
                             recv=record.output_splits, record=record, group=self.ep_group)

    def post_combine(self, rows_RD: torch.Tensor, record: ExchangeRecord) -> Exchange:
        """Post the combine of expert-output rows computed for ``record``'s dispatch."""
        return post_exchange(rows_RD, None, send=record.output_splits, recv=record.input_splits,
                             record=record, group=self.ep_group)


def splits_of(counts: CountsExchange, num_local_experts: int) -> dict:
    """Split sizes and per-expert counts of a landed count exchange, as megatron's preprocess
    derives them (``ExchangeRecord`` field names)."""
    send_PL, recv_PL = counts.send_host_PL, counts.recv_PL
    return {"input_splits": send_PL.sum(dim=1).numpy(),
            "output_splits": recv_PL.sum(dim=1).numpy(),
            "output_splits_tp": np.array([int(recv_PL.sum())]),
            "tokens_per_expert_L": recv_PL.sum(dim=0),
            "num_global_tokens_per_local_expert_PL": recv_PL if num_local_experts > 1 else None}


def record_of(p: "_PendingDispatch", *, step: int, layer: int,
              num_local_experts: int) -> ExchangeRecord:
    """The record of a dispatch whose counts have landed (``splits_of``), with the permutation
    of ``p``."""
    return ExchangeRecord(
        step=step, layer=layer, hidden_shape=p.hidden_shape,
        hidden_shape_before_permute=p.hidden_shape_before_permute,
        routing_map_TE=p.routing_map_TE, sorted_indices_R=p.sorted_indices_R,
        num_out_tokens=int(p.sorted_indices_R.numel()), extras=p.extras,
        **splits_of(p.counts, num_local_experts))


def post_exchange(payload_RD: torch.Tensor, probs_R: Optional[torch.Tensor], *, send, recv,
                  record: ExchangeRecord, group, weighted: bool = True) -> Exchange:
    """Post one async all-to-all (with ``probs_R``: tokens and probs packed into one message);
    the buffers travel with ``record`` in the returned ``Exchange``."""
    send_l, recv_l = [int(x) for x in send], [int(x) for x in recv]
    payload_RX = payload_RD.contiguous() if probs_R is None else pack_rows(payload_RD, probs_R)
    recv_RX = payload_RX.new_empty((sum(recv_l), *payload_RX.shape[1:]))
    handle = dist.all_to_all_single(recv_RX, payload_RX, recv_l, send_l, group=group,
                                    async_op=True)
    unpack = None if probs_R is None else (lambda buf, dt=probs_R.dtype: _unpacked(buf, dt))
    return Exchange(record=record, tokens=recv_RX, probs=None, weighted=weighted,
                    handles=[handle], send=[payload_RX], unpack=unpack)


class StaleAlltoAllTokenDispatcher(PackedAlltoAllTokenDispatcher):
    """The dispatcher whose stale calls exchange across steps (base class of DICE's two modes).

    Exchange schedule of a stale call (docs/design.md "Exchange schedule"; the runtime calls the
    phases in this order: route, ``preprocess``, shared expert, ``token_dispatch``, experts,
    ``token_combine``):

    1. ``preprocess`` posts the count exchange on its own group (``counts_group``), so it never
       queues behind payload still on the wire;
    2. ``token_dispatch`` takes the source exchange, posts this call's OWN dispatch at once if its
       counts have landed (polled, never waited; the shared expert ran in between), then waits
       the source and, if the counts landed meanwhile, posts the own dispatch before the experts;
    3. ``token_combine`` posts the own dispatch if still pending (the only place that blocks on
       the counts) and defers the combine of the rows just computed to the ``CombineOutbox``: it
       goes out right after the NEXT stale call's own dispatch, so a dispatch, which the next ring
       layer needs within one layer, never queues behind a combine, which is needed one step
       later.
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection, *,
                 layer: int, state: LayerState, source_state: LayerState, ledger: CommLedger,
                 timer: PhaseTimer, on_store: Callable[[], None], counts_group=None,
                 outbox: Optional[CombineOutbox] = None):
        super().__init__(num_local_experts, local_expert_indices, config=config,
                         pg_collection=pg_collection, counts_group=counts_group)
        self.layer = layer
        self.state = state
        self.source_state = source_state
        self.ledger = ledger
        self.timer = timer
        self.on_store = on_store
        self.outbox = outbox if outbox is not None else CombineOutbox()
        self.stale = False
        self.step: Optional[int] = None
        self.call: Optional[Call] = None
        self.extras = RecordExtras()
        self.experts_weighted = True
        self.installed: Optional[ExchangeRecord] = None
        self.returned: Optional[Exchange] = None
        self._pending: Optional[_PendingDispatch] = None

    def begin_call(self, call: Call, *, experts_weighted: bool = True,
                   extras: RecordExtras = RecordExtras()) -> None:
        """Set by the runtime before each layer call: the schedule's answer for it
        (``Schedule.call``: stale or not, the step, whether it returns its own work)."""
        if self._pending is not None or self._counts is not None:
            raise RuntimeError(f"layer {self.layer}: previous stale call did not finish")
        if call.layer != self.layer:
            raise ValueError(f"layer {self.layer}: handed the schedule's call of layer {call.layer}")
        self.call, self.stale, self.step = call, call.stale, call.step
        self.experts_weighted = experts_weighted
        self.extras = extras
        self.installed = self.returned = None

    def abort_call(self) -> None:
        """Finish a call that did not (an exception mid-forward, on every rank alike).

        Whether the own dispatch went out before the failure depends on timing and may differ
        between ranks, so a pending one is posted now: every rank then has posted the same
        collectives, and ``LayerState.drain`` can wait on them all without a hang."""
        if self._counts is not None:
            self._counts.wait()
        if self._pending is not None:
            if self.state.dispatch is None:
                self._launch_own_dispatch()
            else:
                self._pending.counts.wait()
        self._counts = self._pending = None

    def _posts_counts(self) -> bool:
        return self.stale or self.stage_counts

    # -- dispatch ------------------------------------------------------------------------------
    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        if not self.stale:
            return super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        self._pending = self.stage(permutated_local_input_tokens, permuted_probs, self.extras)
        source = self.source_state.take("dispatch")  # moved out first: the slot may be reused
        self._launch_own_dispatch_if_ready()
        with self.timer.phase("wait_dispatch"):
            source.wait()
        self._launch_own_dispatch_if_ready()
        install_record(self, source.record)
        self.installed = source.record
        return source.tokens, source.probs

    def _launch_own_dispatch_if_ready(self) -> None:
        if self._pending is not None and self._pending.counts.ready():
            self._launch_own_dispatch()

    # -- combine -------------------------------------------------------------------------------
    def token_combine(self, hidden_states, async_finish=True, allocate_on_comm_stream=True):
        if not self.stale:
            return super().token_combine(hidden_states)
        if self._pending is not None:
            self._launch_own_dispatch()
        # taking a slot only moves the exchange out of the held state; its wait comes last.
        # The schedule says which combine is returned: the held one, or (a ring of one) the one
        # this call is about to post
        own = None if self.call.own_work else self.state.take("combine")
        computed, weighted, step = self.installed, self.experts_weighted, self.step

        def post_combine():
            self.source_state.put("combine", self._launch(
                "combine", hidden_states, None, send=computed.output_splits,
                recv=computed.input_splits, record=computed, weighted=weighted,
                group=self.ep_group, step=step))
            self.on_store()

        self.outbox.defer(post_combine)
        if own is None:  # ring of one: the combine just deferred is the one returned
            self.outbox.flush()
            own = self.state.take("combine")
        with self.timer.phase("wait_combine"):
            own.wait()
        install_record(self, own.record)
        self.installed, self.returned = own.record, own
        return own.tokens

    def _launch_own_dispatch(self) -> None:
        p, self._pending = self._pending, None
        with self.timer.phase("wait_counts"):
            p.counts.wait()
        record = record_of(p, step=self.step, layer=self.layer,
                           num_local_experts=self.num_local_experts)
        self.state.put("dispatch", self._launch(
            "dispatch", p.tokens_RD, p.probs_R, send=record.input_splits,
            recv=record.output_splits, record=record, group=self.ep_group, step=self.step))
        self.outbox.flush()

    def _launch(self, kind: str, payload_RD, probs_R, *, send, recv, record: ExchangeRecord,
                group, step: int, weighted: bool = True) -> Exchange:
        """Post the async all-to-all of one exchange and count it in the ledger."""
        send_l = [int(x) for x in send]
        me = self.ep_group.rank()
        row_bytes = payload_RD[0].numel() * payload_RD.element_size() if len(payload_RD) else 0
        self.ledger.sent(step=step, layer=record.layer, kind=kind, rows=sum(send_l),
                         token_bytes=payload_RD.numel() * payload_RD.element_size(),
                         prob_bytes=0 if probs_R is None else probs_R.numel() * 4,
                         remote_rows=sum(send_l) - send_l[me], row_bytes=row_bytes)
        return post_exchange(payload_RD, probs_R, send=send, recv=recv, record=record,
                             group=group, weighted=weighted)


def _unpacked(buf_RX: torch.Tensor, probs_dtype: torch.dtype):
    tokens_RD, probs_R = unpack_rows(buf_RX)
    return tokens_RD, probs_R.to(probs_dtype)
