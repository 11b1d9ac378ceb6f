"""``ParallelDims``: the sizes of a run's parallel dimensions and its rank layout, as plain data.

Owns the one check that the data-, expert- and sequence-parallel sizes fit the world
(``validate``), the rank layouts (``ORDERS``: which dimension varies fastest with the rank) and the
rank lists of every group a run creates (``ep_ranks``, ``expt_dp_ranks``, ``sp_ranks``), and
``choose_order``: the layout a run uses on given hosts (the ``rank_layout`` setting, ``auto``
deciding from the hosts). Nothing here imports torch or starts a process group: settings
validation calls ``validate`` before any group exists, ``dice_ds.parallel.topology`` gathers the
hosts, and ``dice_ds.parallel.groups`` builds the groups from these lists.

Layouts (``order``; each rank r has coordinates e (EP rank), s (SP rank), d (data-parallel index)):

- ``ep-inner`` (the default on one host): EP innermost, SP next, DP outermost:
  r = (d·sp + s)·ep + e. World 4, ep 2, sp 2: EP groups [0,1] [2,3], SP groups [0,2] [1,3],
  expert-data-parallel groups (ranks holding the same experts) [0,2] [1,3].
- ``sp-inner``: SP innermost, EP next, DP outermost: r = (d·ep + e)·sp + s. World 4, ep 2, sp 2:
  SP groups [0,1] [2,3], EP groups [0,2] [1,3].
- ``dp-inner``: DP innermost, EP next, SP outermost: r = (s·ep + e)·dp + d. World 4, ep 2: EP groups
  [0,2] [1,3], expert-DP groups [0,1] [2,3] (on 2 nodes of 2 ranks: the EP groups cross the nodes).

In every layout the members of a group, in increasing rank, are its ranks in increasing
coordinate (torch orders a group's ranks so): EP rank k is the member with e = k and holds global
experts [k·E/ep, (k+1)·E/ep) (megatron's contiguous placement); SP rank k holds token chunk k.
Ranks of one node are the ranks whose hosts are equal (any assignment of ranks to hosts).
"""

from __future__ import annotations

from dataclasses import dataclass

from dice_ds.config import ConfigError
from dice_ds.ds_config import RANK_LAYOUTS

ORDERS: dict[str, tuple[str, str, str]] = {
    "ep-inner": ("ep", "sp", "dp"),
    "sp-inner": ("sp", "ep", "dp"),
    "dp-inner": ("dp", "ep", "sp"),
}
"""Each concrete layout: its dimensions from the fastest-varying with the rank to the slowest."""
assert tuple(ORDERS) == RANK_LAYOUTS[1:], "ds_config.RANK_LAYOUTS lists the layouts of ORDERS"

EXCHANGE_EVERY_LAYER = ("ep", "sp")
"""Group kinds that exchange in every layer of every step: ``auto`` keeps them inside nodes."""


@dataclass(frozen=True)
class ParallelDims:
    """World size, the expert- and sequence-parallel group sizes (dp is what is left) and the
    rank layout (``ORDERS``)."""

    world: int
    ep: int = 1
    sp: int = 1
    order: str = "ep-inner"

    @property
    def dp(self) -> int:
        return self.world // (self.ep * self.sp)

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    def validate(self, *, num_experts: int | None = None, tokens: int | None = None
                 ) -> "ParallelDims":
        """Raise ``ConfigError`` naming the size and the fix; ``num_experts`` (E) and ``tokens``
        (tokens of one image) are checked when given."""
        if self.world < 1:
            raise ConfigError(f"world size {self.world} must be >= 1")
        if self.ep < 1 or self.world % self.ep:
            raise ConfigError(f"ep_size={self.ep} (--ep-size) must divide the world size "
                              f"{self.world}")
        if self.sp < 1 or self.world % (self.ep * self.sp):
            raise ConfigError(f"sp_size={self.sp} (--sp-size) times ep_size={self.ep} (--ep-size) "
                              f"must divide the world size {self.world}")
        if self.order not in ORDERS:
            raise ConfigError(f"rank_layout={self.order!r} (--rank-layout): use one of "
                              f"{', '.join(RANK_LAYOUTS)}")
        if num_experts is not None and num_experts % self.ep:
            raise ConfigError(f"num_experts={num_experts} is not divisible by the expert-parallel "
                              f"size {self.ep} (--ep-size): pick an EP size that divides "
                              f"{num_experts}")
        if tokens is not None and self.sp_enabled and tokens % self.sp:
            raise ConfigError(f"sp_size={self.sp} (--sp-size): the {tokens} tokens of an image do "
                              f"not split into {self.sp} equal chunks; use an SP size that divides "
                              f"{tokens}")
        return self

    def with_order(self, order: str) -> "ParallelDims":
        return ParallelDims(self.world, self.ep, self.sp, order)

    def size(self, kind: str) -> int:
        return {"ep": self.ep, "sp": self.sp, "dp": self.dp}[kind]

    def coords(self, rank: int) -> dict[str, int]:
        """Rank ``rank``'s coordinates {'ep': e, 'sp': s, 'dp': d} in this layout."""
        out, rest = {}, rank
        for kind in ORDERS[self.order]:
            rest, out[kind] = divmod(rest, self.size(kind))
        return out

    def _groups(self, kind: str) -> list[list[int]]:
        """The groups of ranks that differ in ``kind``'s coordinate only, each in increasing rank,
        ordered by their first rank."""
        by_rest: dict[tuple, list[int]] = {}
        for r in range(self.world):
            c = self.coords(r)
            by_rest.setdefault(tuple(v for k, v in sorted(c.items()) if k != kind), []).append(r)
        return sorted(by_rest.values())

    def ep_ranks(self) -> list[list[int]]:
        """EP groups (``ep-inner``: contiguous blocks of ``ep`` ranks)."""
        return self._groups("ep")

    def expt_dp_ranks(self) -> list[list[int]]:
        """Expert-data-parallel groups: the ranks holding the same experts (same EP rank;
        ``ep-inner``: stride ``ep``)."""
        groups: dict[int, list[int]] = {}
        for r in range(self.world):
            groups.setdefault(self.coords(r)["ep"], []).append(r)
        return sorted(groups.values())

    def sp_ranks(self) -> list[list[int]]:
        """SP groups (``ep-inner``: stride ``ep`` inside each block of ep·sp ranks)."""
        return self._groups("sp")

    def kinds(self) -> dict[str, list[list[int]]]:
        """Every group kind this run creates -> its rank lists."""
        kinds = {"ep": self.ep_ranks(), "expt_dp": self.expt_dp_ranks()}
        if self.sp_enabled:
            kinds["sp"] = self.sp_ranks()
        return kinds

    def layout(self, hosts: list[str]) -> dict:
        """The layout's name, every group kind's rank lists and the groups whose members sit on
        more than one host (``hosts[r]``: rank r's host name): what crosses the network between
        nodes. JSON-able, for run.json's ``layout``."""
        if len(hosts) != self.world:
            raise ValueError(f"{len(hosts)} hosts for a world of {self.world} ranks")
        kinds = self.kinds()
        return {
            "order": self.order,
            "hosts": list(hosts),
            "nodes": len(set(hosts)),
            "groups": kinds,
            "crossing_nodes": {kind: [g for g in groups if len({hosts[r] for r in g}) > 1]
                               for kind, groups in kinds.items()},
        }


def crossing(dims: ParallelDims, hosts: list[str]) -> dict[str, int]:
    """How many ranks are in a group that has members on more than one host, for each per-layer
    kind (EP when ep > 1, SP when sp > 1): the ranks whose every-layer exchange crosses nodes."""
    lay = dims.layout(hosts)["crossing_nodes"]
    return {k: sum(len(g) for g in lay[k]) for k in EXCHANGE_EVERY_LAYER
            if k in lay and dims.size(k) > 1}


def choose_order(dims: ParallelDims, setting: str, hosts: list[str]) -> tuple[ParallelDims, str]:
    """(``dims`` in the layout a run uses, why): ``setting`` when it names a layout; for ``auto``
    the layout with the fewest ranks in EP and SP groups that cross nodes on ``hosts``
    (``crossing``), ``ep-inner`` on a tie (so on one host, and wherever it is as good, the layout
    is ``ep-inner``)."""
    if setting != "auto":
        out = dims.with_order(setting).validate()
        return out, f"--rank-layout {setting}"
    nodes = len(set(hosts))
    if nodes == 1:
        return dims.with_order("ep-inner"), "auto: one host, nothing crosses nodes"
    scored = [(sum(crossing(dims.with_order(o), hosts).values()), i, o)
              for i, o in enumerate(ORDERS)]
    total, _, best = min(scored)
    chosen = dims.with_order(best)
    counts = crossing(chosen, hosts)
    per_kind = ", ".join(f"{k.upper()} {n} of {dims.world}" for k, n in counts.items()) \
        or "no EP or SP group"
    return chosen, (f"auto: {nodes} hosts; {best} has the fewest ranks in EP/SP groups that "
                    f"cross nodes ({per_kind})"
                    + ("; ties keep ep-inner" if best == "ep-inner" else ""))
