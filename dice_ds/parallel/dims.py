"""``ParallelDims``: the sizes of a run's parallel dimensions and its rank layout, as plain data.

Owns the one check that the data-, expert- and sequence-parallel sizes fit the world
(``validate``), and the rank lists of every group a run creates (``ep_ranks``, ``expt_dp_ranks``,
``sp_ranks``). Nothing here imports torch or starts a process group: settings validation calls
``validate`` before any group exists, and ``dice_ds.parallel.groups`` builds the groups from these
lists.

Layout (EP innermost, SP next, data parallel outermost): rank r = (d·sp + s)·ep + e. With world 4,
ep 2, sp 2: EP groups [0,1] [2,3], SP groups [0,2] [1,3], expert-data-parallel groups (ranks that
hold the same experts) [0,2] [1,3]. Inside an EP group megatron places experts contiguously: EP rank
k holds global experts [k·E/ep, (k+1)·E/ep).
"""

from __future__ import annotations

from dataclasses import dataclass

from dice_ds.config import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """World size and the expert- and sequence-parallel group sizes; dp is what is left."""

    world: int
    ep: int = 1
    sp: int = 1

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
        if num_experts is not None and num_experts % self.ep:
            raise ConfigError(f"num_experts={num_experts} is not divisible by the expert-parallel "
                              f"size {self.ep} (--ep-size): pick an EP size that divides "
                              f"{num_experts}")
        if tokens is not None and self.sp_enabled and tokens % self.sp:
            raise ConfigError(f"sp_size={self.sp} (--sp-size): the {tokens} tokens of an image do "
                              f"not split into {self.sp} equal chunks; use an SP size that divides "
                              f"{tokens}")
        return self

    def ep_ranks(self) -> list[list[int]]:
        """EP groups: contiguous blocks of ``ep`` ranks."""
        return [list(range(s, s + self.ep)) for s in range(0, self.world, self.ep)]

    def expt_dp_ranks(self) -> list[list[int]]:
        """Expert-data-parallel groups: the ranks holding the same experts (stride ``ep``)."""
        return [list(range(s, self.world, self.ep)) for s in range(self.ep)]

    def layout(self, hosts: list[str]) -> dict:
        """Every group kind's rank lists and the groups whose members sit on more than one host
        (``hosts[r]``: rank r's host name): what crosses the network between nodes. JSON-able,
        for run.json's ``layout``."""
        if len(hosts) != self.world:
            raise ValueError(f"{len(hosts)} hosts for a world of {self.world} ranks")
        kinds = {"ep": self.ep_ranks(), "expt_dp": self.expt_dp_ranks()}
        if self.sp_enabled:
            kinds["sp"] = self.sp_ranks()
        return {
            "hosts": list(hosts),
            "nodes": len(set(hosts)),
            "groups": kinds,
            "crossing_nodes": {kind: [g for g in groups if len({hosts[r] for r in g}) > 1]
                               for kind, groups in kinds.items()},
        }

    def sp_ranks(self) -> list[list[int]]:
        """SP groups: stride ``ep`` inside each block of ep·sp ranks (contiguous when ep is 1)."""
        block = self.ep * self.sp
        return [[d * block + s * self.ep + e for s in range(self.sp)]
                for d in range(self.world // block) for e in range(self.ep)]
