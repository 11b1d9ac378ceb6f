"""``dice-ds bench --nodes M --ranks-per-node K``: every mode on emulated nodes, in both rank layouts.

Owns what differs from the flat bench (``dice_ds.bench.cli``): the fabric is
``dice_ds.bench.nodes.Nodes(M, K)`` (the ranks of a node share its namespace and talk over its
loopback, unshaped; nodes talk over their veths, shaped to each ``--links`` rate, ``loopback``
there meaning unshaped); every mode runs with groups of one node's size (``dice_ds.bench.arrangements
.node_sizes``: EP K, SP K, the EP x SP mesh K x M) in each arrangement of
``dice_ds.bench.arrangements.arrangements``: ``inside`` (the rank layout ``--rank-layout auto`` picks:
EP groups, or SP groups without EP, inside nodes) and ``across`` (the other layout: they cross
nodes); a mode without groups (DP) runs in both, as the compute reference of each. ``inside``
runs with ``--rank-layout auto`` and ``across`` with the other layout named; a run whose
run.json names another layout than expected counts as failed. A run's bench
"link" is ``"<rate> <arrangement>"`` (e.g. ``100mbit inside``), so every table row, speed-up and
PSNR compares modes within one arrangement; ``meta.arrangements`` records each run's layout, which
``dice-ds plan --validate`` (``dice_ds.plan.validate``) predicts row by row with the two-level
fabric model and the plan's pick per mode.

No communication probe runs here: the validation takes the links from a 2-rank ``--calibration``
bench of the same job (its ``loopback`` probe is the intra-node link, its rate's probe a node's
inter-node link).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dice_ds.bench import launch
from dice_ds.bench.arrangements import (
    ARRANGEMENTS,
    arrangements,
    label,
    node_hosts,
    node_settings,
    node_sizes,
)
from dice_ds.bench.jobs import run_config, run_settings
from dice_ds.bench.nodes import Nodes
from dice_ds.config import ConfigError
from dice_ds.ds_config import Settings
from dice_ds.modes import by_key
from dice_ds.options import ep_size_of, from_overrides, sp_size_of
from dice_ds.parallel.dims import ParallelDims
from dice_ds.workload import workload_of_settings

MAX_NODES = 8


def node_run_settings(a, job: Settings, mode: str, arrangement: str) -> Settings | None:
    """Mode ``mode``'s settings on the nodes in ``arrangement`` (group sizes and rank layout), or
    None when the mode has no such arrangement (its groups span every node in every layout)."""
    world = a.nodes * a.ranks_per_node
    if mode in getattr(a, "custom", {}):
        s = run_settings(a, job, mode)
    else:
        by_key(mode)
        ep, sp = node_sizes(mode, a.ranks_per_node, a.nodes,
                            workload_of_settings(job).cfg.num_experts)
        s = from_overrides(node_settings(mode, ep, sp), base=job)
    dims = ParallelDims(world, ep_size_of(s, world), sp_size_of(s, world))
    hosts = node_hosts(a.nodes, a.ranks_per_node)
    if not (dims.ep_enabled or dims.sp_enabled):
        return s  # no group to place: the compute reference of every arrangement
    order = arrangements(dims, hosts).get(arrangement)
    if order is None:
        return None
    # inside is what the run's own auto choice must give (checked on the run's run.json)
    return from_overrides({"rank_layout": "auto" if arrangement == "inside" else order}, base=s)


def expected_order(a, job: Settings, mode: str, arrangement: str) -> str:
    """The layout a run of ``mode`` in ``arrangement`` must use (auto's pick for ``inside``)."""
    world = a.nodes * a.ranks_per_node
    s = node_run_settings(a, job, mode, arrangement)
    dims = ParallelDims(world, ep_size_of(s, world), sp_size_of(s, world))
    if not (dims.ep_enabled or dims.sp_enabled):
        return "ep-inner"
    hosts = node_hosts(a.nodes, a.ranks_per_node)
    return arrangements(dims, hosts)[arrangement]


def run_layout(rec: dict) -> str | None:
    """The layout a finished run used (its run.json's ``layout.order``)."""
    if not rec.get("ok"):
        return None
    info = json.loads((Path(rec["latents"]).parent / "run.json").read_text())
    return info.get("layout", {}).get("order")


def run(a, modes: list[str], link_list: list[str], out: Path, sysctls: tuple[str, ...],
        progress) -> dict:
    """Every (rate, arrangement, round, mode) run on the nodes; returns the runs and the meta
    entries of the node bench."""
    runs, loads, shaping, unavailable, layouts = [], [], {}, {}, {}
    port = 29700 + os.getpid() % 1000
    with Nodes(a.nodes, a.ranks_per_node, sysctls) as net:
        for link in link_list:
            net.shape(None if link == "loopback" else link, burst=a.burst)
            if link != "loopback":
                shaping[link] = (f"tbf rate {link} burst {net.burst_used[link]} latency 100ms on "
                                 "every node's link" + (f"; {', '.join(sysctls)}" if sysctls else ""))
            for arr in ARRANGEMENTS:
                name = label(link, arr)
                for rnd in range(a.rounds):
                    for m in modes:
                        if m in unavailable:
                            continue
                        run_dir = out / link / arr / m / f"r{rnd}"
                        try:
                            s = node_run_settings(a, a.job, m, arr)
                            if s is None:
                                continue
                            layouts.setdefault(name, {})[m] = expected_order(a, a.job, m, arr)
                            argv = run_config(s, run_dir)
                        except (ConfigError, ValueError) as e:
                            argv, rec = None, {"ok": False, "why": str(e), "logs": str(run_dir)}
                        port += 2
                        loads.append(os.getloadavg()[0])
                        if argv is not None:
                            rec = launch.sample_run(net, name, port, argv, run_dir, a.run_timeout)
                        rec.update(link=name, mode=m, round=rnd, layout=run_layout(rec))
                        want = layouts.get(name, {}).get(m)
                        if rec["ok"] and rec["layout"] != want:
                            rec.update(ok=False, why=f"ran in layout {rec['layout']}, not {want}")
                        runs.append(rec)
                        progress(rec, rnd, loads[-1], unavailable)
    return {"runs": runs, "loads": loads, "shaping": shaping, "unavailable": unavailable,
            "arrangements": layouts}


def check(a, p) -> None:
    """The node flags (``--nodes``, ``--ranks-per-node``); sets ``a.ranks`` to the world."""
    if a.ranks_per_node is None:
        p.error("--nodes needs --ranks-per-node K")
    if not 2 <= a.nodes <= MAX_NODES:
        p.error(f"--nodes {a.nodes}: use 2 to {MAX_NODES}")
    if a.ranks_per_node < 1 or a.nodes * a.ranks_per_node > 16:
        p.error(f"--ranks-per-node {a.ranks_per_node}: use 1 or more, at most 16 ranks in all")
    if "--ranks" in sys.argv[1:]:
        p.error("--ranks and --nodes: give --nodes M --ranks-per-node K (the world is M x K)")
    a.ranks = a.nodes * a.ranks_per_node


def meta(a, res: dict) -> dict:
    """The node bench's entries of bench.json's meta."""
    return {"nodes": a.nodes, "ranks_per_node": a.ranks_per_node,
            "arrangements": res["arrangements"],
            "fabric": f"{a.nodes} nodes x {a.ranks_per_node} ranks (dice_ds/bench/nodes.py): "
                      "inside a node its loopback, between nodes each --links rate on every "
                      "node's link",
            "probes_note": "no probe on nodes: dice-ds plan --validate takes the links from a "
                           "2-rank --calibration bench of the same job",
            "time": time.strftime("%H:%M UTC", time.gmtime())}
