"""Two-level fabric for ``dice-ds plan``: nodes of K ranks, a fast link inside a node, a slower
one between nodes, and the rank layouts a run can choose on it.

Owns ``Fabric`` (intra- and inter-node ``Link``, ranks per node, whether the inter-node link is one
per node, shared by its ranks -- the emulated nodes of ``dice_ds.bench.nodes``, a cluster with one
NIC per node -- or one per rank), ``kind_link`` (the link one group kind sees in a layout) and
``predict_layout`` / ``predict_layouts`` (the mode's prediction in each arrangement of
``dice_ds.bench.arrangements``, groups of one node's size; the faster one is ``picked``).

The link of a group kind (``kind_link``): rank r of a group of g sends the share f = (its peers
on other nodes) / (g - 1) of its bytes off-node. Inside the node they move at the intra rate,
off-node at the inter rate divided by the c ranks of r's node that send off-node in the same
collective (c = 1 with one inter-node link per rank); both parts move at once, so a byte costs
max((1 - f) / intra, c·f / inter) seconds; the group's link is its slowest rank's. Latency and
head-of-line bytes are the larger of the two links' once anything crosses. The exchange schedule
itself is ``dice_ds.plan.sim``'s, with the EP all-to-alls on the EP link and the blocking SP
gathers on the SP link (displaced SP's bucketed gathers queue on the rank's one egress FIFO, the
EP link's in an EP x SP mesh: an approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

from dice_ds.bench.arrangements import arrangements, node_hosts, node_settings, node_sizes
from dice_ds.options import flags_of
from dice_ds.parallel.dims import ParallelDims
from dice_ds.plan.costs import LayerCosts
from dice_ds.plan.predict import build_plan, predict_plan
from dice_ds.plan.presets import Link
from dice_ds.plan.sim import Loads
from dice_ds.workload import Workload


def group_loads(loads: Loads, group: list[int]) -> Loads:
    """The expert loads of one EP group (``loads`` gives every rank of the world's, relative to
    the world's mean) relative to the group's own mean."""
    def of(i: int, layer: int) -> list:
        sub = [loads(i, layer)[r] for r in group]
        mean = sum(sub) / len(sub)
        return [x / mean if mean else 1.0 for x in sub]
    return of


@dataclass(frozen=True)
class Fabric:
    """M nodes of K ranks: ``intra`` between ranks of a node, ``inter`` between nodes."""

    intra: Link
    inter: Link
    ranks_per_node: int
    nodes: int
    nic_per_rank: bool = False
    """The inter-node link is one per rank (a GPU cluster with a NIC per GPU) instead of one per
    node shared by its ranks (the emulated nodes)."""

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def hosts(self) -> list[str]:
        """Every rank's host, ranks numbered node by node (as launchers number them)."""
        return node_hosts(self.nodes, self.ranks_per_node)


def kind_link(fabric: Fabric, groups: list[list[int]], hosts: list[str]) -> Link:
    """The link the groups of one kind see in one layout (module docstring)."""
    f = {}
    for g in groups:
        for r in g:
            off = sum(hosts[p] != hosts[r] for p in g if p != r)
            f[r] = off / (len(g) - 1) if len(g) > 1 else 0.0
    if max(f.values(), default=0.0) == 0.0:
        return fabric.intra
    sharing = {h: (1 if fabric.nic_per_rank else sum(f[r] > 0 for r in f if hosts[r] == h))
               for h in set(hosts)}

    def rate(intra_bw: float, inter_bw: float) -> float:
        worst = max(max((1 - f[r]) / intra_bw, sharing[hosts[r]] * f[r] / inter_bw) for r in f)
        return 1.0 / worst

    a, b = fabric.intra, fabric.inter
    return Link(f"{a.name} + {b.name}", rate(a.bandwidth, b.bandwidth),
                max(a.latency, b.latency), max(a.hol_bytes, b.hol_bytes),
                single_bandwidth=rate(a.lone_rate, b.lone_rate),
                gather_bandwidth=rate(a.gather_bandwidth or a.lone_rate,
                                      b.gather_bandwidth or b.lone_rate),
                cpu_per_byte=max(a.cpu_per_byte, b.cpu_per_byte),
                cpu_own_per_byte=max(a.cpu_own_per_byte, b.cpu_own_per_byte))


def predict_layout(mode: str, w: Workload, costs: LayerCosts, fabric: Fabric, order: str,
                   loads: Loads | None = None, cores: float = 0.0,
                   settings: dict | None = None) -> dict:
    """``mode`` on ``fabric`` with its node sizes in rank layout ``order``; ``loads``: every
    rank's expert load per (step, layer), the first EP group's are used."""
    ep, sp = node_sizes(mode, fabric.ranks_per_node, fabric.nodes, w.cfg.num_experts)
    settings = dict(settings) if settings is not None else node_settings(mode, ep, sp)
    plan = build_plan(settings, w, fabric.world)
    dims = ParallelDims(fabric.world, plan.ep_size, plan.sp_size, order).validate()
    hosts = fabric.hosts()
    lay = dims.layout(hosts)
    ep_link = kind_link(fabric, dims.ep_ranks(), hosts)
    sp_link = kind_link(fabric, dims.sp_ranks(), hosts) if dims.sp_enabled else None
    main = ep_link if dims.ep_enabled else (sp_link or fabric.intra)
    if loads is not None and dims.ep_enabled:  # the world's loads (a bench's sync run)
        loads = group_loads(loads, dims.ep_ranks()[0])
    pred = predict_plan(plan, w, costs, main, loads, cores=cores, sp_link=sp_link)
    return {"mode": mode, "settings": settings, "flags": " ".join(flags_of(settings)),
            "layout": order, **pred,
            "ep_link": ep_link.name if dims.ep_enabled else None,
            "sp_link": sp_link.name if sp_link else None,
            "crossing_nodes": {k: len(v) for k, v in lay["crossing_nodes"].items()}}


def predict_layouts(mode: str, w: Workload, costs: LayerCosts, fabric: Fabric,
                    loads: Loads | None = None, cores: float = 0.0) -> list[dict]:
    """The mode in each arrangement (``arrangements``); the fastest is ``picked``."""
    ep, sp = node_sizes(mode, fabric.ranks_per_node, fabric.nodes, w.cfg.num_experts)
    rows = [{"arrangement": arr, **predict_layout(mode, w, costs, fabric, order, loads, cores)}
            for arr, order in arrangements(ParallelDims(fabric.world, ep, sp),
                                           fabric.hosts()).items()]
    best = min(rows, key=lambda r: r["batch_seconds"])
    for r in rows:
        r["picked"] = r is best
        r["vs_picked"] = r["batch_seconds"] / best["batch_seconds"]
    return rows

