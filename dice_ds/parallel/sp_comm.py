"""The K/V communication of sequence parallelism: blocking gathers and displaced SP's manager.

Owns ``gather_chunks`` (one blocking ``all_gather_into_tensor`` of equal-size chunks, rank order),
``SPLedger`` (bytes exchanged and buffer bytes) and ``KVCommManager``, displaced SP's exchange
(DistriFusion's comm-buffer pattern): every attention layer registers its stacked K/V shape once per
batch (``store_sync`` at the batch's first, synchronous step); the layers are grouped into buckets of
``bucket_layers`` consecutive layers, each with one flat send buffer [F] and one receive buffer
[W, F]; a layer copies its fresh K/V into its send slot (``enqueue``) and the bucket's last layer
launches ONE async all-gather for the whole bucket; the next step waits on a bucket's handle only
when its first layer needs the remote K/V (``remote``).

Invariants:
- a receive buffer is overwritten only by the all-gather launched after every layer of its bucket
  has read it (reads happen before enqueue, the launch after the bucket's last enqueue);
- a send buffer is written only after the bucket's previous all-gather was waited on;
- ``drain()`` waits on every handle; ``reset()`` drains, then frees every buffer and registration
  (a batch boundary clears everything; pitfall 9: no handle is ever dropped).

Shape legend: W SP size, N batch (CFG included), H heads, t tokens per rank, K head dim;
a K/V slot is [2, N, H, t, K] (K and V stacked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""torch >= 2.13 names it ``all_gather_single``; ``all_gather_into_tensor`` before (equal sizes:
list ``all_gather`` of uneven sizes fails on gloo)."""


def all_gather_flat(out_W_: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """Gather ``x`` (same shape on every rank) into ``out_W_`` [W, *x.shape], rank order."""
    out = out_W_.view(out_W_.shape[0] * x.shape[0], *x.shape[1:]) if x.dim() else out_W_
    return _ALL_GATHER(out, x.contiguous(), group=group, async_op=async_op)


def gather_chunks(x: torch.Tensor, group) -> torch.Tensor:
    """[W, *x.shape]: every rank's ``x`` (equal shapes) in group rank order; blocking."""
    out = x.new_empty((group.size(), *x.shape))
    all_gather_flat(out, x, group)
    return out


@dataclass
class SPLedger:
    """Bytes this rank received from the other SP ranks (= bytes it sent: gathers are symmetric)."""

    bytes_by_kind: dict = field(default_factory=dict)
    gathers: int = 0
    buffer_peak_bytes: int = 0

    def gathered(self, kind: str, chunk_bytes: int, world: int) -> None:
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + chunk_bytes * (world - 1)
        self.gathers += 1

    def observe_buffers(self, nbytes: int) -> None:
        self.buffer_peak_bytes = max(self.buffer_peak_bytes, nbytes)

    def reset(self) -> None:
        self.bytes_by_kind.clear()
        self.gathers = 0
        self.buffer_peak_bytes = 0


@dataclass
class _Bucket:
    layers: tuple[int, ...]
    send: torch.Tensor        # [F]
    recv: torch.Tensor        # [W, F]
    offsets: dict             # layer -> (start, numel, shape)
    handle: object = None


class KVCommManager:
    """Displaced SP's K/V exchange: registered slots, bucketed async all-gathers, lazy waits."""

    def __init__(self, group, num_layers: int, bucket_layers: int, ledger: SPLedger):
        self.group = group
        self.world = group.size()
        self.rank = group.rank()
        self.num_layers = num_layers
        self.bucket_layers = bucket_layers
        self.ledger = ledger
        self._shapes: dict[int, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._buckets: dict[int, _Bucket] = {}
        self._pending: dict[int, torch.Tensor] = {}

    # -- sync steps: registration (first step of a batch) and refill --------------------------
    def _bucket_layers(self, b: int) -> tuple[int, ...]:
        start = b * self.bucket_layers
        return tuple(range(start, min(start + self.bucket_layers, self.num_layers)))

    def store_sync(self, layer: int, kv: torch.Tensor, gathered_WKV: torch.Tensor) -> None:
        """A sync step's gathered K/V [W, 2, N, H, t, K] of ``layer`` becomes the next step's
        remote K/V. The first call of a layer in a batch registers its slot; a bucket is
        allocated once all its layers have registered (until then their gathers are held)."""
        if layer in self._shapes and self._shapes[layer][0] != kv.shape:
            self.reset()  # another batch shape on a sync step: register every slot anew
        if layer not in self._shapes:
            self._shapes[layer] = (kv.shape, kv.dtype, kv.device)
        bucket = layer // self.bucket_layers
        self._pending[layer] = gathered_WKV
        if bucket not in self._buckets:
            members = self._bucket_layers(bucket)
            if not all(l in self._shapes for l in members):
                return
            self._allocate(bucket, members)
        b = self._buckets[bucket]
        self._wait(b)
        for l in [l for l in self._pending if l in b.offsets]:
            start, n, _ = b.offsets[l]
            b.recv[:, start:start + n].copy_(self._pending.pop(l).reshape(self.world, n))

    def _allocate(self, bucket: int, members: tuple[int, ...]) -> None:
        offsets, start = {}, 0
        for l in members:
            shape = self._shapes[l][0]
            offsets[l] = (start, shape.numel(), shape)
            start += shape.numel()
        _, dtype, device = self._shapes[members[0]]
        self._buckets[bucket] = _Bucket(
            members, torch.empty(start, dtype=dtype, device=device),
            torch.empty(self.world, start, dtype=dtype, device=device), offsets)
        self.ledger.observe_buffers(self.nbytes())

    def _slot(self, layer: int) -> tuple[_Bucket, int, int, torch.Size]:
        b = self._buckets.get(layer // self.bucket_layers)
        if b is None:
            raise RuntimeError(f"SP layer {layer}: no K/V buffer; the first step of a batch must "
                               "be a synchronous step (Schedule.sp_sync_steps)")
        start, n, shape = b.offsets[layer]
        return b, start, n, shape

    # -- async steps -------------------------------------------------------------------------------
    def remote(self, layer: int) -> torch.Tensor:
        """[W, 2, N, H, t, K]: every rank's K/V as last exchanged (waits on the bucket lazily)."""
        b, start, n, shape = self._slot(layer)
        self._wait(b)
        return b.recv[:, start:start + n].view(self.world, *shape)

    def enqueue(self, layer: int, kv: torch.Tensor) -> None:
        """Copy this step's own K/V into the send slot; the bucket's last layer launches the
        bucket's async all-gather (waited at the next step, when a layer of it needs it)."""
        b, start, n, _ = self._slot(layer)
        self._wait(b)
        b.send[start:start + n].copy_(kv.reshape(n))
        if layer == b.layers[-1]:
            b.handle = all_gather_flat(b.recv, b.send, self.group, async_op=True)
            self.ledger.gathered("kv_async", b.send.numel() * b.send.element_size(), self.world)

    # -- lifecycle ---------------------------------------------------------------------------------
    @staticmethod
    def _wait(b: _Bucket) -> None:
        if b.handle is not None:
            b.handle.wait()
            b.handle = None

    def drain(self) -> None:
        for b in self._buckets.values():
            self._wait(b)

    def reset(self) -> None:
        self.drain()
        self._buckets.clear()
        self._shapes.clear()
        self._pending.clear()

    def inflight_handles(self) -> int:
        return sum(b.handle is not None for b in self._buckets.values())

    def nbytes(self) -> int:
        """Bytes of every held buffer (send + receive)."""
        return sum(b.send.numel() * b.send.element_size() + b.recv.numel() * b.recv.element_size()
                   for b in self._buckets.values())
