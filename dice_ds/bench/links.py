"""Emulated links for ``dice-ds bench``: the flat fabric, N ranks each on a node of its own.

Owns ``Links``: ``dice_ds.bench.nodes.Nodes(N, 1)`` (one namespace per rank on one bridge, each
rank's link shaped to the rate; the builder, the shaping and the clean-up are ``Nodes``') plus the
flat bench's two differences: ``use_netns=False`` makes no namespace at all (loopback only, no
root needed), and the ``loopback`` link puts every rank on one shared loopback (rank 0's
namespace when there are namespaces, else the host's). Every rank of a flat job sees
``LOCAL_WORLD_SIZE`` = N (they all share this machine's memory: the memory check counts them
together). Addresses: 10.200.0.<i+1> (``addr``).

The shaping helpers (``rate_bits``, ``small_burst``, ``available``, ``DEFAULT_SYSCTLS``) live in
``dice_ds.bench.nodes``; this module re-exports them for the flat bench's callers.
"""

from __future__ import annotations

import os

from dice_ds.bench.nodes import DEFAULT_SYSCTLS, Nodes, available, node_addr, rate_bits, small_burst

__all__ = ["DEFAULT_SYSCTLS", "Links", "addr", "available", "rate_bits", "small_burst"]

SUBNET = 200


def addr(rank: int) -> str:
    """Rank ``rank``'s address on the flat fabric."""
    return node_addr(rank, SUBNET)


class Links(Nodes):
    """The namespaces of ``ranks`` ranks and their bridge; ``shape(link)`` sets every rank's rate,
    ``rank_env(link, rank, port)`` places a rank."""

    def __init__(self, use_netns: bool, sysctls: tuple[str, ...] = DEFAULT_SYSCTLS,
                 ranks: int = 2):
        if not 2 <= ranks <= 250:
            raise ValueError(f"ranks {ranks}: use 2 to 250")
        super().__init__(ranks, 1, sysctls, tag="R", subnet=SUBNET, host_names=False)
        self.use_netns = use_netns

    def __enter__(self) -> "Links":
        return super().__enter__() if self.use_netns else self

    def shape(self, link: str, burst: str = "small") -> None:
        """Shape both ends of every rank's veth to ``link`` (a tc rate); loopback needs nothing."""
        if link != "loopback":
            super().shape(link, burst=burst)

    def rank_env(self, link: str, rank: int, port: int) -> tuple[list[str], dict]:
        """(command prefix, environment) placing ``rank`` of the ``ranks``-rank job on ``link``."""
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(self.ranks), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(self.ranks), MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if link == "loopback":
            env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
            return (self.prefix(0) if self.use_netns else []), env
        if not self.use_netns:
            raise RuntimeError(f"link {link}: shaped links need network namespaces")
        env.update(MASTER_ADDR=self.addr(0), GLOO_SOCKET_IFNAME=self.dev(rank))
        return self.prefix(rank), env
