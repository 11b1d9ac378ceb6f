"""Sequence (patch) parallelism of DiT-MoE: sync SP and displaced SP (DistriFusion).

Owns ``SequenceParallelRuntime``, attached to a model by ``install`` (``parallelize_dit_moe`` does
it when ``plan.sp_size > 1``) through two seams of the plain model: ``model.sp_runtime`` (after the
embeddings every rank keeps its contiguous chunk of T/W tokens of every image; before the final
layer the chunks are all-gathered, so every rank computes the full output) and each attention's
``runtime`` (``attention_kv``: local Q against full-length K/V). Everything else (adaLN, MoE,
final layer) runs on the local tokens; with ``ep_size > 1`` as well the MoE layers' own EP runtime
exchanges each token shard's expert work.

K/V per attention layer and step (``Schedule.sp_sync_step``):
- sync step: one blocking all-gather of the stacked K/V (exact attention). Displaced SP also
  registers the layer's slot and stores the gathered K/V as the next step's remote K/V;
- async step (displaced SP): the other ranks' K/V from the previous step (``KVCommManager.remote``)
  with this rank's own chunk replaced by its fresh K/V; then the fresh K/V are enqueued for the
  next step's bucketed async all-gather.

Lifecycle (``dice_ds.lifecycle``): ``with runtime.batch(schedule):`` around a batch (its start and
its end, normal or not, drain and free every buffer; the schedule is the call's, built by the
pipeline, never here), ``begin_step(i)`` before every forward (the step index comes from the
pipeline's loop), ``stats()``.

Shape legend: N batch (CFG included), T tokens, t = T/W, D hidden, H heads, K head dim, W SP size.
"""

from __future__ import annotations

from typing import Optional

import torch

from dice_ds.lifecycle import BatchLifecycle
from dice_ds.parallel.sp_comm import KVCommManager, SPLedger, gather_chunks
from dice_ds.schedule import Schedule


class SequenceParallelRuntime(BatchLifecycle):
    """Runs a DiT-MoE's token sharding and attention K/V exchange under a ``ParallelPlan``."""

    def __init__(self, model, plan, group):
        if group is None or group.size() != plan.sp_size:
            raise ValueError(f"SequenceParallelRuntime: need an SP group of size {plan.sp_size}")
        self.model = model
        self.plan = plan
        self.group = group
        self.world = group.size()
        self.rank = group.rank()
        self.depth = len(model.blocks)
        self.ledger = SPLedger()
        self.manager = (KVCommManager(group, self.depth, plan.sp_bucket_layers, self.ledger)
                        if plan.sp_async else None)
        self.schedule: Optional[Schedule] = None
        self._step: Optional[int] = None
        self._sync = True

    # -- attach --------------------------------------------------------------------------------
    def install(self) -> "SequenceParallelRuntime":
        if self.model.sp_runtime is not None:
            raise RuntimeError("the model already has a sequence-parallel runtime; detach() it")
        self.model.sp_runtime = self
        for l, block in enumerate(self.model.blocks):
            block.attn.runtime = self
            block.attn.sp_index = l
        return self

    def detach(self) -> None:
        self._finish()
        self.model.sp_runtime = None
        for block in self.model.blocks:
            block.attn.runtime = None
            del block.attn.sp_index

    # -- lifecycle -------------------------------------------------------------------------------
    def _start(self, schedule: Schedule) -> None:
        """Start of a batch: wait on every handle and free every K/V buffer."""
        if schedule.depth != self.depth or schedule.sp_size != self.world \
                or schedule.sp_async != (self.manager is not None):
            raise ValueError(f"SequenceParallelRuntime: the batch's schedule (depth "
                             f"{schedule.depth}, sp_size {schedule.sp_size}, sp_async "
                             f"{schedule.sp_async}) is not this runtime's plan: build it with "
                             "Schedule.build(plan, steps, depth)")
        self._finish()
        self.schedule = schedule

    def begin_step(self, step: int) -> None:
        if self.schedule is None or not self.in_batch:
            raise RuntimeError("SequenceParallelRuntime: begin_step outside "
                               "`with runtime.batch(schedule)`")
        self._sync = self.schedule.sp_sync_step(step)
        self._step = step
        if self.manager is not None and self.schedule.sp_clears_cache(step):
            self.manager.drain()  # sync step: nothing may still be in flight (pitfall 9)

    def _finish(self) -> None:
        if self.manager is not None:
            self.manager.reset()
        self._step = None

    _abort = _finish
    """every rank posts the same all-gathers in the same order, so waiting on them all after a
    failure on every rank alike cannot hang (``KVCommManager.reset``)"""

    def inflight_handles(self) -> int:
        return self.manager.inflight_handles() if self.manager is not None else 0

    def held_bytes(self) -> int:
        return self.manager.nbytes() if self.manager is not None else 0

    def reset_stats(self) -> None:
        self.ledger.reset()

    # -- model seams -------------------------------------------------------------------------------
    def _tokens_per_rank(self, tokens: int) -> int:
        if tokens % self.world:
            raise ValueError(f"sequence parallelism: {tokens} tokens do not split into "
                             f"{self.world} equal chunks")
        return tokens // self.world

    def shard_tokens(self, x_NTD: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous chunk [N, t, D] (no communication: every rank has the batch)."""
        t = self._tokens_per_rank(x_NTD.shape[1])
        return x_NTD[:, self.rank * t:(self.rank + 1) * t].contiguous()

    def gather_tokens(self, x_NtD: torch.Tensor) -> torch.Tensor:
        """[N, T, D]: every rank's chunk in rank order (blocking; the only sync gather of
        displaced SP)."""
        out_WNtD = gather_chunks(x_NtD, self.group)
        self.ledger.gathered("x", x_NtD.numel() * x_NtD.element_size(), self.world)
        n, t, d = x_NtD.shape
        return out_WNtD.permute(1, 0, 2, 3).reshape(n, self.world * t, d)

    def attention_kv(self, attn, k_NHtK: torch.Tensor, v_NHtK: torch.Tensor):
        """Full-length K and V [N, H, T, K] for this rank's queries (module docstring)."""
        if self._step is None:
            raise RuntimeError("SequenceParallelRuntime: call begin_step(i) before every model "
                               "forward")
        l = attn.sp_index
        kv = torch.stack([k_NHtK, v_NHtK])                 # [2, N, H, t, K]
        if self._sync:
            gathered = gather_chunks(kv, self.group)       # [W, 2, N, H, t, K]
            self.ledger.gathered("kv_sync", kv.numel() * kv.element_size(), self.world)
            if self.manager is not None:
                self.manager.store_sync(l, kv, gathered)
            chunks = list(gathered.unbind(0))
        else:
            chunks = list(self.manager.remote(l).unbind(0))
            chunks[self.rank] = kv                         # own K/V always fresh
        full = torch.cat(chunks, dim=-2)                    # [2, N, H, T, K]
        if not self._sync:
            self.manager.enqueue(l, kv)                    # after the reads of this bucket slot
        return full[0], full[1]

    # -- report ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        by_kind = dict(self.ledger.bytes_by_kind)
        kv = by_kind.get("kv_sync", 0) + by_kind.get("kv_async", 0)
        return {
            "sp_size": self.world,
            "sp_mode": "displaced" if self.manager is not None else "sync",
            "sp_sync_steps": sorted(self.schedule.sp_sync_steps, reverse=True)
            if self.schedule else [],
            "sp_bucket_layers": self.plan.sp_bucket_layers if self.manager is not None else None,
            "sp_kv_buffer_bytes": self.ledger.buffer_peak_bytes,
            "sp_kv_bytes_exchanged": kv,
            "sp_kv_bytes_exchanged_sync": by_kind.get("kv_sync", 0),
            "sp_kv_bytes_exchanged_async": by_kind.get("kv_async", 0),
            "sp_x_bytes_exchanged": by_kind.get("x", 0),
            "sp_bytes_exchanged": sum(by_kind.values()),
            "sp_all_gathers": self.ledger.gathers,
        }
