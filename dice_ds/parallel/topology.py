"""Where the ranks of a run sit: every rank's host, gathered once at start-up, and the rank layout
chosen on them.

Owns ``place_ranks`` (a collective over the default group: every rank's host name, then
``dice_ds.parallel.dims.choose_order`` with the ``rank_layout`` setting) and ``Placement`` (the
run's ``ParallelDims`` in the chosen layout, why it was chosen, the hosts; ``record()`` is
run.json's ``layout``, ``line()`` the line rank 0 prints at start-up). ``dice_ds.parallel.groups``
builds the groups from ``Placement.dims``.

Host names are ``socket.gethostname()``: on a cluster every node's own (slurm, torchrun and the
DeepSpeed launcher all start a node's ranks on that node), on the emulated nodes of
``dice_ds.bench.nodes`` the node's UTS name. Ranks with equal host names are one node.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch.distributed as dist

from dice_ds.parallel.dims import ParallelDims, choose_order


@dataclass(frozen=True)
class Placement:
    """The run's sizes in its rank layout, on its hosts."""

    dims: ParallelDims
    why: str
    hosts: tuple[str, ...]

    def record(self) -> dict:
        """run.json's ``layout``: the layout, why, every rank's host and the groups crossing
        nodes (``ParallelDims.layout``)."""
        return {**self.dims.layout(list(self.hosts)), "why": self.why}

    def line(self) -> str:
        """One line for the start-up log: the layout, why, and what crosses nodes."""
        rec = self.record()
        cross = {k: g for k, g in rec["crossing_nodes"].items() if g}
        groups = "; ".join(f"{k} {' '.join(map(_show, gs))}" for k, gs in rec["groups"].items()
                           if k != "ep" or self.dims.ep_enabled)
        return (f"dice-ds: rank layout {self.dims.order} ({self.why}) on {rec['nodes']} host(s): "
                f"{groups}; crossing nodes: "
                + ("; ".join(f"{k} {' '.join(map(_show, gs))}" for k, gs in cross.items())
                   or "none"))


def _show(ranks: list[int]) -> str:
    return "[" + ",".join(map(str, ranks)) + "]"


def gather_hosts() -> list[str]:
    """Every rank's host name, by rank (a collective over the default group)."""
    me = socket.gethostname()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [me]
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, me)
    return [str(h) for h in hosts]


def place_ranks(world: int, ep: int, sp: int, setting: str) -> Placement:
    """Collective: the layout of a run of ``world`` ranks with these EP and SP sizes on the hosts
    the ranks run on (``setting``: the ``rank_layout`` setting, ``auto`` or a layout)."""
    hosts = gather_hosts()
    dims, why = choose_order(ParallelDims(world, ep, sp), setting, hosts)
    return Placement(dims, why, tuple(hosts))
