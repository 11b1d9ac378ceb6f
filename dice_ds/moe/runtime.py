"""``DiceRuntime``: one object per model that runs every DiT-MoE MoE layer under a parallel plan.

Owns the per-call orchestration of megatron's MoE phases (shared expert, route, preprocess,
dispatch, expert compute, combine, postprocess) for sync, displaced and interweaved expert
parallelism (spec §2.2-§2.5), the cross-layer interweaved ring, conditional communication, the
payload dtype, and the run's measurements. ``DiTMoELayer.forward`` hands each call to
``moe_forward(layer, h_S1D)``, which returns the layer output INCLUDING the shared expert.

Who holds what:
- ``states[l]`` (``LayerState``): layer l's exchanges held across steps and its slot cache;
- the stale dispatchers (``dice_ds.moe.dispatcher``) own the communication of stale calls and move
  records in and out of megatron's attributes; they read/write ``states`` given to them;
- the runtime holds references to every layer, so an interweaved layer computes its ring
  predecessor's experts; the seeded 'rand' skip generator; the timer and the comm ledger.

Contract with the pipeline's loop (``dice_ds.lifecycle``): ``with runtime.batch(schedule):`` around
each batch (resets at entry; at exit finishes, or on an exception aborts, every exchange in flight),
``begin_step(i)`` before EVERY model forward (i counts down S..1; the runtime never counts steps),
``stats()`` afterwards. The schedule is the call's (``dice_ds.schedule.Schedule``, built by the
pipeline): the runtime never builds one, it asks it what each (step, layer) call computes and
returns. Schedule entries of ``stats()`` describe the last batch; traffic, cache and phase
counters accumulate until ``reset_stats()``.

Invariants:
- a sync call runs megatron's own phases (its all-to-all dispatcher), so sync EP output equals
  megatron's ``MoELayer.forward`` bitwise; at a sync step every in-flight exchange is waited on
  before anything is cleared (pitfall 9), then async layers refill the exchanges the next async
  step reads, with the fresh data and no handle;
- conditional communication: a layer skips one slot per token on every step ``is_skip_step`` names
  once it has launched a full exchange in the batch (the skipped slots are filled from its
  slot cache, which needs one); the skipped (token, expert) entries are removed from the routing
  map before megatron's preprocess, so they are neither permuted, sent nor computed. The 'rand'
  mask is redrawn for every skipping (step, layer) from the runtime's generator, reseeded at the
  start of every batch (pitfall 10).

Shape legend: S = T tokens of one call (N·T_img), D hidden, E experts, R permuted rows, 2 slots.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from dice_ds.lifecycle import BatchLifecycle
from dice_ds.models.dit_moe import DTYPES
from dice_ds.moe import halves, importance
from dice_ds.moe.profile import CommLedger, PhaseTimer
from dice_ds.moe.records import Exchange, LayerState, RecordExtras, SlotCache
from dice_ds.schedule import Layout, Schedule

"""Tokens and expert outputs are cast to the payload dtype for the all-to-all and back after it;
router probs always travel in fp32 (a [R] vector: 1/D of the token bytes, and the expert weights
stay exact)."""


@dataclass(frozen=True, eq=False)
class _Routing:
    """One call's slot bookkeeping: top-2 slot experts / probs and the skipped slot."""

    slot_ids_T2: Optional[torch.Tensor] = None
    slot_probs_T2: Optional[torch.Tensor] = None
    skipped_slot_T: Optional[torch.Tensor] = None


class DiceRuntime(BatchLifecycle):
    """Runs the MoE layers of one model under a ``ParallelPlan`` (see ``parallelize_dit_moe``)."""

    def __init__(self, layers, plan, groups, device: torch.device | str = "cpu"):
        self.layers = {layer.moe_index: layer for layer in layers}
        self.depth = len(self.layers)
        self.plan = plan
        self.groups = groups
        self.ep_size = groups.ep_size
        self.stale_enabled = plan.async_enabled
        self.skip_enabled = plan.skip_period > 1 and self.ep_size > 1
        self.current_weights = plan.stale_output_weights == "current"
        # the layer structure (async layers, ring: step-independent) picks the dispatchers; each
        # batch's schedule comes from the pipeline and must have this layout
        self.layout = Layout.of(plan, self.depth)
        self.async_layers = self.layout.async_layers
        self.ring = {l: self.layout.ring[l] for l in self.async_layers}
        self.schedule: Optional[Schedule] = None
        self.states = {l: LayerState(l) for l in self.layers}
        self.timer = PhaseTimer(device)
        self.ledger = CommLedger()
        # the all-to-all payload dtype (None: the activations' own); nothing is sent at EP 1
        self.payload_dtype = DTYPES.get(plan.payload_dtype) if self.ep_size > 1 else None
        act = next(iter(self.layers.values())).config.params_dtype
        self.payload_dtype_name = next(
            (n for n, d in DTYPES.items() if d == (self.payload_dtype or act)), str(act))
        self._rand = torch.Generator()
        self._megatron_dispatchers: dict = {}
        # dice_ds.moe.dispatcher subclasses megatron's dispatcher, so importing it imports megatron:
        # imported here, when a runtime is built, so that importing this module does not
        from dice_ds.moe import dispatcher
        self._dispatcher = dispatcher
        self.outbox = dispatcher.CombineOutbox()
        """stale combines go out on the dispatch group right after the next own dispatch (one
        FIFO, dispatches first; docs/design.md "Exchange schedule" has the measured options)."""
        self._clear_run()

    # -- lifecycle -----------------------------------------------------------------------------
    def _clear_run(self) -> None:
        self._rand.manual_seed(self.plan.skip_seed)
        self._step: Optional[int] = None
        self._step_sync = True
        self._called: set = set()
        self._skip_log: dict = defaultdict(list)

    def install(self, make_pg_collection) -> "DiceRuntime":
        """Attach to every layer; give async layers a stale dispatcher (megatron's is kept)."""
        for l, layer in self.layers.items():
            old = layer.token_dispatcher
            if l in self.async_layers:
                self._megatron_dispatchers[l] = old
                layer.token_dispatcher = self._dispatcher.StaleAlltoAllTokenDispatcher(
                    old.num_local_experts, old.local_expert_indices, layer.config,
                    make_pg_collection(), layer=l, state=self.states[l],
                    source_state=self.states[self.ring[l]], ledger=self.ledger, timer=self.timer,
                    on_store=self._observe_cache,
                    counts_group=getattr(self.groups, "ep_counts", None), outbox=self.outbox)
            elif self.ep_size > 1:  # sync-only layer: megatron's dispatcher, one message a dispatch
                self._megatron_dispatchers[l] = old
                layer.token_dispatcher = self._dispatcher.PackedAlltoAllTokenDispatcher(
                    old.num_local_experts, old.local_expert_indices, config=layer.config,
                    pg_collection=make_pg_collection(),
                    counts_group=getattr(self.groups, "ep_counts", None))
            layer.runtime = self
        return self

    def detach(self) -> None:
        """Undo ``install``: drain, restore megatron's dispatchers, detach from the layers."""
        self._finish()
        for l, disp in self._megatron_dispatchers.items():
            self.layers[l].token_dispatcher = disp
        self._megatron_dispatchers.clear()
        for layer in self.layers.values():
            layer.runtime = None

    def _start(self, schedule: Schedule) -> None:
        """Start of a batch under ``schedule``: clear all state, reseed 'rand'."""
        if schedule.depth != self.depth or schedule.layout != self.layout:
            raise ValueError(f"DiceRuntime: the batch's schedule (depth {schedule.depth}, "
                             f"{schedule.layout}) is not this runtime's plan (depth {self.depth}, "
                             f"{self.layout}): build it with Schedule.build(plan, steps, depth)")
        self._abort()
        self.schedule = schedule

    def _abort(self) -> None:
        """Wait on every in-flight handle (every rank posted the same collectives, also after an
        exception mid-forward: ``abort_call``) and clear all state."""
        for layer in self.layers.values():
            if isinstance(layer.token_dispatcher, self._dispatcher.StaleAlltoAllTokenDispatcher):
                layer.token_dispatcher.abort_call()
        self.outbox.flush()
        for st in self.states.values():
            st.reset()
        self._clear_run()

    def reset_stats(self) -> None:
        self.timer.reset()
        self.ledger.reset()

    def begin_step(self, step: int) -> None:
        """Before EVERY model forward of a batch: step i counts down from S to 1."""
        if self.schedule is None or not self.in_batch:
            raise RuntimeError("DiceRuntime: begin_step outside `with runtime.batch(schedule)`")
        if not 1 <= step <= self.schedule.num_steps:
            raise ValueError(f"begin_step({step}): need 1 <= step <= {self.schedule.num_steps}")
        self._step = step
        self._step_sync = self.schedule.ep_sync_step(step)
        self._called.clear()
        if self._step_sync:
            with self.timer.phase("drain"):
                self.outbox.flush()
                for st in self.states.values():
                    st.drain()

    def _finish(self) -> None:
        """End of a batch: wait on everything in flight and free every held buffer."""
        with self.timer.phase("drain"):
            self.outbox.flush()
            for st in self.states.values():
                st.reset()
        self._step = None

    def inflight_handles(self) -> int:
        return sum(st.inflight_handles() for st in self.states.values())

    def held_bytes(self) -> int:
        return sum(st.nbytes() for st in self.states.values())

    def _observe_cache(self) -> None:
        sends = sum(x.send_nbytes() for st in self.states.values() for x in st.exchanges())
        self.ledger.observe_cache(self.held_bytes(), sends)

    # -- per-call orchestration ----------------------------------------------------------------
    def layer_is_stale(self, layer: int) -> bool:
        # without async layers nothing is ever stale (and DP may run without begin_step)
        return bool(self.async_layers) and self.schedule.ep_stale(self._step, layer)

    def moe_forward(self, layer, h_S1D: torch.Tensor) -> torch.Tensor:
        l = layer.moe_index
        self.timer.tag = (self._step, l)
        if self.stale_enabled or self.skip_enabled:
            if self._step is None:
                raise RuntimeError("DiceRuntime: call begin_step(i) before every model forward")
            if l in self._called and self.stale_enabled:
                raise RuntimeError(f"MoE layer {l} called twice in step {self._step}: call "
                                   "begin_step before every model forward")
            self._called.add(l)
        if self.layer_is_stale(l):
            return self._stale_forward(layer, h_S1D)
        return self._sync_forward(layer, h_S1D)

    def _route(self, layer, h_S1D):
        with self.timer.phase("router"):
            probs_TE, rmap_TE = layer.route(h_S1D)
        # 'current' weights reweight stale rows by slot, so every record of an async layer needs
        # its slots, also the sync-step records that the next async step consumes
        async_current = self.current_weights and layer.moe_index in self.async_layers
        if not (self.skip_enabled or async_current):
            return probs_TE, rmap_TE, _Routing()
        with self.timer.phase("importance"):
            hi_T, lo_T = importance.slot_experts(probs_TE, rmap_TE)
            slot_ids_T2 = torch.stack([hi_T, lo_T], dim=1)
            slot_probs_T2 = probs_TE.gather(1, slot_ids_T2).float()
            state, skipped_slot_T = self.states[layer.moe_index], None
            if self.skip_enabled and self.schedule.skips(self._step, layer.moe_index):
                if not state.full_launched:  # the schedule never skips before a full exchange
                    raise RuntimeError(f"layer {layer.moe_index} step {self._step}: skip scheduled "
                                       "before any full exchange of the batch (begin_step order?)")
                skipped_TE = importance.skip_map(probs_TE, rmap_TE, self.plan.skip_strategy,
                                                 self._rand)
                # slot 0 (higher score) skipped where the skip mask hits the hi expert
                skipped_slot_T = (~skipped_TE.gather(1, hi_T.unsqueeze(1)).squeeze(1)).long()
                rmap_TE = rmap_TE & ~skipped_TE
                self._skip_log[layer.moe_index].append(self._step)
            else:
                state.full_launched = True
        return probs_TE, rmap_TE, _Routing(slot_ids_T2, slot_probs_T2, skipped_slot_T)

    def _extras(self, layer, routing: _Routing, rmap_TE) -> RecordExtras:
        """Slot of every permuted row (megatron's permutation is expert-major, tokens ascending)."""
        if routing.slot_ids_T2 is None:
            return RecordExtras()
        rows_token_R = layer.token_dispatcher.reversed_local_input_permutation_mapping
        expert_R = layer.row_experts(rmap_TE)  # logical experts, also under a placement
        row_slot_R = (expert_R != routing.slot_ids_T2[rows_token_R, 0]).to(torch.int8)
        return RecordExtras(row_slot_R=row_slot_R, slot_probs_T2=routing.slot_probs_T2,
                            skipped_slot_T=routing.skipped_slot_T)

    def _to_payload(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.payload_dtype is None else x.to(self.payload_dtype)

    def _count_sync(self, layer: int, payload, probs, kind: str, splits) -> None:
        """Ledger entry of a sync call's exchange (``splits``: rows to each EP rank)."""
        if self.ep_size == 1:
            return
        me, rows = self.groups.ep_rank, int(payload.shape[0])
        row_bytes = payload[0].numel() * payload.element_size() if rows else 0
        self.ledger.sent(step=self._step, layer=layer, kind=kind, rows=rows,
                         token_bytes=payload.numel() * payload.element_size(),
                         prob_bytes=0 if probs is None else probs.numel() * probs.element_size(),
                         remote_rows=rows - int(splits[me]), row_bytes=row_bytes)

    def _sync_forward(self, layer, h_S1D: torch.Tensor) -> torch.Tensor:
        """megatron's phases, plus records for the exchanges the next async step reads."""
        l, disp, act = layer.moe_index, layer.token_dispatcher, h_S1D.dtype
        self.outbox.flush()  # deferred stale combines go before this call's collectives
        # DP may run without begin_step: then there is no call to ask about
        call = (self.schedule.call(self._step, l)
                if self.schedule is not None and self._step is not None else None)
        if isinstance(disp, self._dispatcher.StaleAlltoAllTokenDispatcher):
            disp.begin_call(call)
        overlap = (call is not None and call.overlap and self.ep_size > 1
                   and h_S1D.shape[0] >= 2)
        shared = None
        if not overlap:
            with self.timer.phase("shared"):
                shared = layer.shared_experts_compute(h_S1D)
        probs_TE, rmap_TE, routing = self._route(layer, h_S1D)
        if overlap:
            recv_RD, recv_probs, rows_RD, shared = self._overlapped(layer, h_S1D, probs_TE, rmap_TE)
            extras = self._extras(layer, routing, rmap_TE)
        else:
            with self.timer.phase("preprocess"):
                tokens_RD, probs_R = layer.preprocess(h_S1D, probs_TE, rmap_TE)
            extras = self._extras(layer, routing, rmap_TE)
            tokens_RD = self._to_payload(tokens_RD)
            with self.timer.phase("dispatch"):
                recv_RD, recv_probs = layer.dispatch(tokens_RD, probs_R)
            self._count_sync(l, tokens_RD, probs_R, "dispatch", disp.input_splits)
            if self.timer.trace is not None and self.ep_size > 1:  # profiling: the call's splits
                self.timer.trace.append(("splits", [int(x) for x in disp.input_splits],
                                         [int(x) for x in disp.output_splits], self.timer.tag))
        keep_dispatch, keep_combine = self.layout.keeps[l]  # what the next async step reads
        record = None
        if self.ep_size > 1 and (keep_dispatch or keep_combine or extras.row_slot_R is not None):
            record = self._dispatcher.capture_record(disp, step=self._step, layer=l, extras=extras)
        if keep_dispatch:
            self.states[l].put("dispatch", Exchange(record, recv_RD, recv_probs))
        if not overlap:
            with self.timer.phase("experts"):
                out_RD, _ = layer.routed_experts_compute(recv_RD.to(act), recv_probs)
            out_RD = self._to_payload(out_RD)
            with self.timer.phase("combine"):
                rows_RD = layer.combine(out_RD)
            self._count_sync(l, out_RD, None, "combine", disp.output_splits)
        if keep_combine:
            self.states[l].put("combine", Exchange(record, rows_RD, weighted=True))
        if keep_dispatch or keep_combine:
            self._observe_cache()
        with self.timer.phase("postprocess"):
            return self._postprocess(layer, rows_RD.to(act), record, True, routing, shared, False)

    def _overlapped(self, layer, h_S1D, probs_TE, rmap_TE):
        """One sync call as two micro-batches (``Call.overlap``): the token halves are permuted
        and their counts posted, the shared expert runs while the counts land, both dispatches go
        out, then each half's experts run while the other half's exchange is on the wire. Returns
        the merged received tokens and probs, the merged combined rows and the shared expert's
        output, with the one-batch call's record installed in the dispatcher
        (``dice_ds.moe.halves``)."""
        l, disp, act = layer.moe_index, layer.token_dispatcher, h_S1D.dtype
        self.ledger.overlapped_calls += 1
        half = h_S1D.shape[0] // 2  # the CFG halves when guided: [cond images, uncond images]
        parts = (slice(0, half), slice(half, None))
        staged = []
        with self.timer.phase("preprocess"):
            disp.stage_counts = True
            try:
                for sl in parts:
                    tokens_RD, probs_R = layer.preprocess(h_S1D[sl], probs_TE[sl], rmap_TE[sl])
                    staged.append(disp.stage(self._to_payload(tokens_RD), probs_R))
            finally:
                disp.stage_counts = False
        with self.timer.phase("shared"):  # the counts land meanwhile
            shared = layer.shared_experts_compute(h_S1D)
        dispatches = []
        with self.timer.phase("dispatch"):
            for p in staged:
                ex = disp.post_dispatch(p, step=self._step, layer=l)
                self._count_sync(l, p.tokens_RD, p.probs_R, "dispatch", ex.record.input_splits)
                dispatches.append(ex)
        combines = []
        for ex in dispatches:
            with self.timer.phase("wait_dispatch"):
                ex.wait()
            self._dispatcher.install_record(disp, ex.record)
            with self.timer.phase("experts"):
                out_RD, _ = layer.routed_experts_compute(ex.tokens.to(act), ex.probs)
            out_RD = self._to_payload(out_RD)
            with self.timer.phase("combine"):
                combines.append(disp.post_combine(out_RD, ex.record))
            self._count_sync(l, out_RD, None, "combine", ex.record.output_splits)
        with self.timer.phase("wait_combine"):
            for ex in combines:
                ex.wait()
        a, b = (ex.record for ex in dispatches)
        record = halves.merged_record(a, b, hidden_shape=h_S1D.shape,
                                      hidden_shape_before_permute=h_S1D.view(-1, h_S1D.shape[-1]).shape)
        self._dispatcher.install_record(disp, record)
        da, db = dispatches
        got_a, got_b = halves.received_chunks(a), halves.received_chunks(b)
        recv_RD = halves.interleave(da.tokens, db.tokens, got_a, got_b)
        recv_probs = halves.interleave(da.probs, db.probs, got_a, got_b)
        rows_RD = halves.interleave(combines[0].tokens, combines[1].tokens,
                                    halves.sent_chunks(a), halves.sent_chunks(b))
        return recv_RD, recv_probs, rows_RD, shared

    def _stale_forward(self, layer, h_S1D: torch.Tensor) -> torch.Tensor:
        """One async call: this step's tokens go out, a stale exchange is computed and returned."""
        l, disp, act = layer.moe_index, layer.token_dispatcher, h_S1D.dtype
        call = self.schedule.call(self._step, l)
        source = self.layers[call.computes[1]]  # whose experts run: the schedule's answer
        disp.begin_call(call, experts_weighted=not self.current_weights)
        probs_TE, rmap_TE, routing = self._route(layer, h_S1D)
        with self.timer.phase("preprocess"):
            tokens_RD, probs_R = layer.preprocess(h_S1D, probs_TE, rmap_TE)  # posts the counts
        disp.extras = self._extras(layer, routing, rmap_TE)
        with self.timer.phase("shared"):  # after the counts went out: they land meanwhile
            shared = layer.shared_experts_compute(h_S1D)
        with self.timer.phase("dispatch"):
            recv_RD, recv_probs = disp.token_dispatch(self._to_payload(tokens_RD), probs_R)
        with self.timer.phase("experts"):
            recv_RD, tokens_per_expert, recv_probs = disp.dispatch_postprocess(
                recv_RD.to(act), recv_probs)
            if self.current_weights:
                recv_probs = torch.ones_like(recv_probs)
            out_RD, _ = source.experts(recv_RD, tokens_per_expert, recv_probs)
            out_RD = disp.combine_preprocess(out_RD)
        with self.timer.phase("combine"):
            rows_RD = disp.token_combine(self._to_payload(out_RD))
        own = disp.returned
        with self.timer.phase("postprocess"):
            return self._postprocess(layer, rows_RD.to(act), own.record, own.weighted, routing,
                                     shared, True)

    def _postprocess(self, layer, rows_RD, record, weighted: bool, routing: _Routing, shared,
                     stale: bool) -> torch.Tensor:
        """Router weights for stale rows, slot cache / skipped-slot fill, unpermute, + shared."""
        if record is None or (not stale and record.extras.row_slot_R is None):
            return layer.postprocess(rows_RD, shared)
        fill_TD = None
        if self.skip_enabled and record.extras.row_slot_R is not None:
            st = self.states[layer.moe_index]
            if record.is_full:
                st.slots = SlotCache.from_rows(rows_RD, record, weighted)
            else:
                if st.slots is None:
                    raise RuntimeError(f"layer {layer.moe_index}: skipped slots but no cache")
                target = routing.slot_probs_T2 if self.current_weights else None
                fill_TD = st.slots.fill_TD(record.extras.skipped_slot_T, target)
        if stale and self.current_weights:
            w_R = record.row_weights_R(routing.slot_probs_T2)
            if weighted:
                w_R = w_R / record.row_weights_R(record.extras.slot_probs_T2)
            rows_RD = rows_RD * w_R.to(rows_RD.dtype).unsqueeze(-1)
        y_S1D = layer.token_dispatcher.combine_postprocess(rows_RD)
        if fill_TD is not None:
            y_S1D = y_S1D + fill_TD.view_as(y_S1D)
        return y_S1D + shared if shared is not None else y_S1D

    # -- report --------------------------------------------------------------------------------
    def stats(self) -> dict:
        """JSON-able measurements (module docstring: which entries are per batch)."""
        secs = self.timer.seconds()
        secs["wait"] = sum(v for k, v in secs.items() if k.startswith("wait_"))
        for key in ("router", "dispatch", "experts", "combine"):
            secs.setdefault(key, 0.0)
        lg = self.ledger
        return {
            "ep_size": self.ep_size,
            "mode": self.plan.mode,
            "sync_steps": sorted(self.schedule.ep_sync_steps) if self.schedule else [],
            "schedule": self.schedule.to_json() if self.schedule else None,
            "async_layers": list(self.async_layers),
            "ring": {str(l): p for l, p in self.ring.items()} if self.layout.ep_mode == "interweaved"
            else {},
            "stale_output_weights": self.plan.stale_output_weights,
            "skip_period": self.plan.skip_period,
            "skip_strategy": self.plan.skip_strategy,
            "skip_steps": {str(l): steps for l, steps in sorted(self._skip_log.items())},
            "ep_cache_peak_bytes": lg.cache_peak_bytes,
            "ep_inflight_send_peak_bytes": lg.send_inflight_peak_bytes,
            "skip_cache_bytes": sum(st.slots.nbytes() for st in self.states.values() if st.slots),
            "a2a_bytes_sent": lg.bytes_sent,
            "a2a_token_bytes_sent": lg.token_bytes_sent,
            "a2a_rows_sent": lg.rows_sent,
            "a2a_rows_sent_remote": lg.rows_sent_remote,
            "a2a_bytes_sent_remote": lg.bytes_sent_remote,
            "a2a_rows_by_step": lg.rows_by_step(),
            "ep_overlapped_calls": lg.overlapped_calls,
            "phase_seconds": secs,
            "payload_dtype": self.payload_dtype_name,
        }
