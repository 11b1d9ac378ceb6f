"""The arrangements of a run on M nodes of K ranks: which rank layout puts a mode's groups
inside nodes and which across them.

Owns the node bench's row names (``label`` / ``split_label``: inter-node rate and arrangement,
e.g. '100mbit inside'), ``node_hosts`` (every rank's host, ranks numbered node by node),
``node_sizes`` / ``node_settings`` (a mode with groups of one node's size: EP K, SP K, the
EP x SP mesh K x M) and ``arrangements`` (``inside``: the layout ``--rank-layout auto`` picks,
``dice_ds/parallel/dims.py``; ``across``: the other layout whose EP groups -- SP groups without
EP -- cross nodes). ``dice_ds.bench.node_bench`` runs these arrangements and
``dice_ds.plan.fabric`` predicts them; nothing here measures or predicts.
"""

from __future__ import annotations

from dice_ds.bench.nodes import node_name
from dice_ds.modes import MESH_MODES, mode_settings
from dice_ds.parallel.dims import ParallelDims, choose_order

ARRANGEMENTS = ("inside", "across")
SP_MODES = ("sp", "sp-async")


def label(link: str, arrangement: str) -> str:
    """A node bench's 'link' of a run (``dice_ds.bench.node_bench``): inter-node rate and
    arrangement, e.g. '100mbit inside'."""
    return f"{link} {arrangement}"


def split_label(text: str) -> tuple[str, str]:
    """(rate, arrangement) of a node bench's 'link'."""
    link, arrangement = text.rsplit(" ", 1)
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"{text!r} is not a node bench row (rate and one of "
                         f"{', '.join(ARRANGEMENTS)})")
    return link, arrangement


def node_hosts(nodes: int, ranks_per_node: int) -> list[str]:
    """Every rank's host, ranks numbered node by node (as launchers number them)."""
    return [node_name(r // ranks_per_node) for r in range(nodes * ranks_per_node)]


def node_sizes(mode: str, k: int, m: int, num_experts: int) -> tuple[int, int]:
    """(EP size, SP size) of ``mode`` on M nodes of K ranks: EP modes one node's ranks (K must
    divide E), SP modes K, the EP x SP mesh K x M, DP 1 x 1."""
    if mode == "dp":
        return 1, 1
    if mode in SP_MODES:
        return 1, k
    if num_experts % k:
        raise ValueError(f"--ranks-per-node {k}: EP groups of one node's ranks need E = "
                         f"{num_experts} divisible by {k}")
    return (k, m) if mode in MESH_MODES else (k, 1)


def node_settings(mode: str, ep: int, sp: int) -> dict:
    """The mode's settings (``dice_ds.modes``) with its group sizes on the nodes."""
    settings = mode_settings(mode, ep, sp)
    if ep > 1:
        settings.update(ep=True, ep_size=ep)
    if sp > 1:
        settings.update(sp=True, sp_size=sp)
    return settings


def _main_kind(dims: ParallelDims) -> str | None:
    return "ep" if dims.ep_enabled else ("sp" if dims.sp_enabled else None)


def arrangements(dims: ParallelDims, hosts: list[str]) -> dict[str, str]:
    """{'inside': the layout ``--rank-layout auto`` picks on ``hosts``, 'across': the first of
    dp-inner, sp-inner whose EP groups (SP groups without EP) cross nodes} (only 'inside' when no
    layout puts them across, e.g. DP, or groups spanning every node anyway)."""
    inside = choose_order(dims, "auto", hosts)[0]
    out = {"inside": inside.order}
    kind = _main_kind(dims)
    if kind is None:
        return out
    mine = inside.kinds()[kind]
    for order in ("dp-inner", "sp-inner"):
        other = dims.with_order(order)
        crossing = other.layout(hosts)["crossing_nodes"][kind]
        if other.kinds()[kind] != mine and crossing:
            out["across"] = order
            break
    return out
