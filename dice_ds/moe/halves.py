"""Two micro-batches of one sync MoE call, put back together as the one call megatron would make.

Owns the merge used by overlapped sync calls (``dice_ds.schedule.Call.overlap``, run by
``dice_ds.moe.runtime``): the call's tokens are split into two halves A (the first) and B, each
half is permuted, dispatched, computed and combined on its own, and then the halves' buffers and
records are merged into exactly the layout and metadata of the one-batch call:

- megatron permutes rows expert-major, tokens ascending (``permute``), so the one-batch call's
  rows of expert e are A's rows of e followed by B's: chunk by chunk, A then B;
- received rows are ordered by source rank, then local expert, and inside each such chunk the
  source's own permuted order: again A's chunk then B's;
- the split sizes and counts of the one-batch call are the sums of the halves'.

So the merged record (``merged_record``) equals the one megatron's dispatcher would have kept for
the whole call, and what a sync call leaves for the next async step (``Layout.keeps``) and its
unpermute are those of a one-batch call; only the expert GEMMs ran on half the rows each (float
rounding). Shape legend: R rows, D hidden, P EP ranks, L local experts, E experts.
"""

from __future__ import annotations

import numpy as np
import torch

from dice_ds.moe.records import ExchangeRecord


def interleave(a: torch.Tensor, b: torch.Tensor, counts_a, counts_b) -> torch.Tensor:
    """Rows of ``a`` and ``b`` (each made of consecutive chunks of ``counts_*`` rows, the same
    chunk list) as chunk 0 of a, chunk 0 of b, chunk 1 of a, ..."""
    ca = [int(x) for x in counts_a]
    cb = [int(x) for x in counts_b]
    if len(ca) != len(cb) or sum(ca) != a.shape[0] or sum(cb) != b.shape[0]:
        raise ValueError(f"interleave: chunks {ca} / {cb} do not cover {a.shape[0]} / "
                         f"{b.shape[0]} rows")
    pieces, ia, ib = [], 0, 0
    for na, nb in zip(ca, cb):
        pieces += [a[ia:ia + na], b[ib:ib + nb]]
        ia, ib = ia + na, ib + nb
    return torch.cat(pieces, dim=0) if pieces else a[:0]


def received_chunks(rec: ExchangeRecord):
    """Rows received from each (source rank, local expert), in receive order."""
    pl = rec.num_global_tokens_per_local_expert_PL
    return np.asarray(rec.output_splits) if pl is None else pl.reshape(-1).tolist()


def sent_chunks(rec: ExchangeRecord) -> list[int]:
    """Rows this rank sent to each expert, in its permuted order (expert-major)."""
    return rec.routing_map_TE.sum(dim=0).tolist()


def merged_record(a: ExchangeRecord, b: ExchangeRecord, *, hidden_shape: torch.Size,
                  hidden_shape_before_permute: torch.Size) -> ExchangeRecord:
    """The record of the one-batch call whose first tokens are ``a``'s and the rest ``b``'s."""
    tokens_a = a.routing_map_TE.shape[0]
    pl = (None if a.num_global_tokens_per_local_expert_PL is None
          else a.num_global_tokens_per_local_expert_PL + b.num_global_tokens_per_local_expert_PL)
    return ExchangeRecord(
        step=a.step, layer=a.layer, hidden_shape=hidden_shape,
        hidden_shape_before_permute=hidden_shape_before_permute,
        routing_map_TE=torch.cat([a.routing_map_TE, b.routing_map_TE], dim=0),
        sorted_indices_R=interleave(a.sorted_indices_R, b.sorted_indices_R + tokens_a,
                                    sent_chunks(a), sent_chunks(b)),
        input_splits=a.input_splits + b.input_splits,
        output_splits=a.output_splits + b.output_splits,
        output_splits_tp=a.output_splits_tp + b.output_splits_tp,
        tokens_per_expert_L=a.tokens_per_expert_L + b.tokens_per_expert_L,
        num_global_tokens_per_local_expert_PL=pl,
        num_out_tokens=int(a.num_out_tokens) + int(b.num_out_tokens))
