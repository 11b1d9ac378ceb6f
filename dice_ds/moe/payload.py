"""Wire formats of the expert all-to-all: tokens and router probs in ONE message, counts on the host.

Owns two small, device-aware pieces used by every dispatcher of ``dice_ds.moe.dispatcher``:

- ``pack_rows`` / ``unpack_rows``: the permuted tokens [R, D] and their fp32 router probs [R] travel
  as one [R, D + c] buffer, the probs' bits appended as c extra columns of the token element size
  (c = 1 for fp32 tokens, 2 for 16-bit tokens). Both are reinterpreted as integers of that size
  before the concatenation, so every bit of both arrives unchanged: a dispatch is one all-to-all
  instead of megatron's two (one rendezvous and one round trip less per layer call), with outputs
  bitwise equal to megatron's separate exchanges. Cost: one copy of the rows on each side.
- ``CountsExchange``: the per-(rank, local expert) row counts that size an all-to-all must be on the
  host (split sizes are Python ints). On CPU that is the tensor itself. On CUDA the copy is posted
  non-blocking into pinned memory with an event, so asking ``ready()`` never blocks and ``get()``
  waits for that copy alone, not for the compute queued after it (no device-wide sync).

Shape legend: R rows (routed slots), D hidden, c prob columns, P EP ranks, L local experts.
"""

from __future__ import annotations

from typing import Optional

import torch

_INT_OF_SIZE = {4: torch.int32, 2: torch.int16}


def prob_columns(token_dtype: torch.dtype) -> int:
    """Columns of the token dtype that hold one fp32 prob."""
    size = torch.empty((), dtype=token_dtype).element_size()
    if size not in _INT_OF_SIZE:
        raise ValueError(f"payload dtype {token_dtype}: need a 2- or 4-byte element type")
    return 4 // size


def pack_rows(tokens_RD: torch.Tensor, probs_R: torch.Tensor) -> torch.Tensor:
    """[R, D] tokens + [R] fp32 probs -> one [R, D + c] buffer (bit-exact, token element size)."""
    as_int = _INT_OF_SIZE[tokens_RD.element_size()]
    cols = prob_columns(tokens_RD.dtype)
    probs_Rc = probs_R.to(torch.float32).contiguous().view(as_int).view(-1, cols)
    packed = torch.cat([tokens_RD.contiguous().view(as_int), probs_Rc], dim=1)
    return packed.view(tokens_RD.dtype)


def unpack_rows(packed_RX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_rows``: (tokens [R, D] contiguous, probs [R] fp32)."""
    cols = prob_columns(packed_RX.dtype)
    as_int = _INT_OF_SIZE[packed_RX.element_size()]
    bits = packed_RX.view(as_int)
    tokens_RD = bits[:, :-cols].contiguous().view(packed_RX.dtype)
    probs_R = bits[:, -cols:].contiguous().view(torch.float32).view(-1)
    return tokens_RD, probs_R


class CountsExchange:
    """The async all-to-all of one call's row counts [P, L], readable on the host when it lands.

    CPU/gloo: the exchange completes on gloo's thread; ``ready()`` polls it. CUDA/NCCL: ``wait()`` on
    the handle only orders the current stream after the exchange, then the received counts are
    copied non-blocking into pinned memory behind an event; ``ready()`` polls the event and
    ``get()`` waits for that copy alone, not for compute queued after it (no device-wide sync).
    """

    def __init__(self, send_PL: torch.Tensor, group):
        import torch.distributed as dist

        self.send_PL = send_PL.contiguous()
        recv_PL = torch.empty_like(self.send_PL)
        self._handle = dist.all_to_all_single(recv_PL, self.send_PL, group=group, async_op=True)
        self._event: Optional[torch.cuda.Event] = None
        if recv_PL.device.type == "cuda":
            self._handle.wait()  # stream order only
            self._handle = None
            self.recv_PL = torch.empty(recv_PL.shape, dtype=recv_PL.dtype, pin_memory=True)
            self.recv_PL.copy_(recv_PL, non_blocking=True)
            self.send_host_PL = torch.empty_like(self.recv_PL)
            self.send_host_PL.copy_(self.send_PL, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self.recv_PL = recv_PL
            self.send_host_PL = self.send_PL

    def ready(self) -> bool:
        if self._event is not None:
            return self._event.query()
        return self._handle is None or self._handle.is_completed()

    def wait(self) -> "CountsExchange":
        """Block until ``recv_PL`` / ``send_host_PL`` hold the counts on the host."""
        if self._handle is not None:
            self._handle.wait()
            self._handle = None
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self
