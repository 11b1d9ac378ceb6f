"""Which samples an SP rank computes and which it writes (the global batch of an SP group).

Owns ``sp_batches``: for batch b of rank r, the list of (indices computed, slice this rank writes)
sub-batches. Without SP a rank computes and writes its own batch (``batch_indices``). With SP the
ranks of one SP group share every forward, so they must hold the same samples:

- default (the reference's global batch): one sub-batch holding the batches of every SP rank in
  SP-rank order; rank k of the group writes its own n of them;
- ``single_img``: one sub-batch per SP rank, holding that rank's n samples only (n = 1: one image
  spread over the group); only that rank writes it.

Either way every global index is computed by the same arithmetic as under DP (sample i's noise and
label depend only on (global seed, i)), so the written image set equals DP's for the same seed, and
the batch count, resume and index formula are unchanged. No communication: every SP rank draws the
group's samples itself, which is what gathering z and y would give.
"""

from __future__ import annotations

from dice_ds.outputs import batch_indices


def sp_group_ranks(plan, rank: int, world: int) -> list[int]:
    """The global ranks of ``rank``'s SP group, in SP-rank order ([rank] without SP)."""
    if not plan.sp_enabled:
        return [rank]
    from dice_ds.parallel.groups import sp_rank_lists

    return next(g for g in sp_rank_lists(world, plan.ep_size, plan.sp_size) if rank in g)


def sp_batches(plan, b: int, rank: int, world: int, n: int) -> list[tuple[list[int], slice]]:
    """[(indices to sample, slice of them this rank writes)] for batch ``b`` (module docstring)."""
    members = sp_group_ranks(plan, rank, world)
    if plan.single_img:
        return [(batch_indices(b, r, world, n), slice(0, n if r == rank else 0)) for r in members]
    k = members.index(rank)
    indices = [i for r in members for i in batch_indices(b, r, world, n)]
    return [(indices, slice(k * n, (k + 1) * n))]
