"""Which samples a rank computes and which it owns, for one global batch (the CLI's batches and the
pipeline's calls alike).

Owns ``call_sub_batches`` (a global batch of B samples, positions 0..B-1) and ``sp_batches`` (the
CLI's batch b, in global sample indices). Position j of a global batch belongs to rank ``j % W``
(the reference's index formula: in the CLI's batch b of n samples per rank, position j is global
index ``b·n·W + j``, ``dice_ds.outputs.batch_indices``); its owner returns / writes it.

Without SP a rank computes exactly the samples it owns. With SP the ranks of one SP group share
every forward, so they must hold the same samples:

- default (the reference's global batch): one sub-batch holding the samples of every SP rank in
  SP-rank order; each rank owns its own slice of it;
- ``single_img``: one sub-batch per SP rank, holding that rank's samples only (n = 1: one image
  spread over the group); only that rank owns it. Empty sub-batches (a member that owns nothing
  when B < W) are left out, on every member alike.

Either way every sample is computed by the same arithmetic as under DP (its noise and label depend
only on the seed and its index), so the image set equals DP's for the same seed. No communication:
every SP rank draws the group's samples itself, which is what gathering z and y would give.
Which ranks form an SP group is the run's rank layout (``dice_ds.parallel.dims``: ``dims``).
"""

from __future__ import annotations

from dice_ds.parallel.dims import ParallelDims


def sp_group_ranks(plan, dims: ParallelDims, rank: int) -> list[int]:
    """The global ranks of ``rank``'s SP group in the run's layout (``dims``), in SP-rank order
    ([rank] without SP)."""
    if not plan.sp_enabled:
        return [rank]
    return next(g for g in dims.sp_ranks() if rank in g)


def owned_positions(batch_size: int, rank: int, world: int) -> list[int]:
    """Positions of a global batch of ``batch_size`` that ``rank`` owns: j with j % W == rank."""
    return list(range(rank, batch_size, world))


def call_sub_batches(plan, dims: ParallelDims, batch_size: int, rank: int
                     ) -> list[tuple[list[int], slice]]:
    """[(positions to sample together, slice of them this rank owns)] (module docstring);
    ``dims``: the run's sizes and rank layout (its SP groups)."""
    world = dims.world
    members = sp_group_ranks(plan, dims, rank)
    if plan.single_img:
        subs = [(owned_positions(batch_size, r, world), r == rank) for r in members]
        return [(pos, slice(0, len(pos) if mine else 0)) for pos, mine in subs if pos]
    positions, start, stop = [], 0, 0
    for r in members:
        own = owned_positions(batch_size, r, world)
        if r == rank:
            start, stop = len(positions), len(positions) + len(own)
        positions += own
    return [(positions, slice(start, stop))] if positions else []


def sp_batches(plan, dims: ParallelDims, b: int, rank: int, n: int
               ) -> list[tuple[list[int], slice]]:
    """[(indices to sample, slice of them this rank writes)] for the CLI's batch ``b`` of ``n``
    samples per rank: ``call_sub_batches`` of its n·W samples, shifted to their global indices."""
    first = b * n * dims.world
    return [([first + j for j in pos], mine)
            for pos, mine in call_sub_batches(plan, dims, n * dims.world, rank)]
