"""Expert placement: which logical experts the physical expert slots of each EP rank hold.

Owns ``Placement`` (the data: per MoE layer, per EP rank, the ordered logical experts of that
rank's slots; JSON-able, ``write`` / ``read``), ``contiguous`` (megatron's placement: rank r holds
experts [r E/W, (r+1) E/W)), ``balanced`` (computed from measured rows per logical expert and
layer: redundant replicas of the hottest experts, then longest-processing-time packing of the
replicas' shares onto ranks with equal slot counts), ``rank_rows`` / ``imbalance`` (the rows each
rank computes under a placement, and the busiest rank over the mean) and ``SlotRouting`` (one
layer's map of a router's logical [T, E] routing onto the physical [T, P] slots one rank
dispatches to).

A placement changes where an expert runs, never what it computes: every physical slot holds the
weights of its logical expert (``dice_ds/weights/load.py`` reads them per slot), and a token routed
to a logical expert goes to exactly one of its replicas, with the router's probability.

Replica choice of a token (``SlotRouting``): a token whose own EP rank holds a replica of the
expert stays local; any other token goes to replica ``t mod k`` of the expert's k replicas (t its
index in the call), a deterministic choice every rank makes alike without communication. With the
tokens spread evenly over the W source ranks, each replica then computes R_e / k of the expert's
R_e rows: a holder gets its own R_e / W plus (W - k) / (W k) R_e of the others' (``rank_rows``
counts with this share).

Invariants: every rank holds the same number of slots in every layer (megatron's dispatcher needs
``num_local_experts`` equal on all EP ranks, and an interweaved layer sorts its ring
predecessor's rows with its own), so the number of physical slots is P = W x slots per rank; every
logical expert has at least one slot. Pure python/torch: no process group, no megatron.

Shape legend: T tokens of one layer call on this rank, E logical experts, P physical slots,
W EP ranks, L slots per rank (P = W L).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from dice_ds.config import ConfigError

FORMAT = "dice_ds.placement/1"
CONTIGUOUS, BALANCED = "contiguous", "balanced"
CHOICES = (CONTIGUOUS, BALANCED)
"""``moe.placement``'s named values; anything else is a placement file (``Placement.read``)."""


@dataclass(frozen=True)
class Placement:
    """Per MoE layer, per EP rank: the logical expert of each of the rank's slots, in slot order.

    Physical slot p of a layer is slot ``p % L`` of rank ``p // L`` (megatron's dispatcher numbers
    its experts rank-major).
    """

    num_experts: int
    ep_size: int
    layers: tuple[tuple[tuple[int, ...], ...], ...]
    source: str = field(default="", compare=False)
    """What the placement was computed from (a run.json, a bench loads file; free text)."""
    rows: Optional[tuple[tuple[float, ...], ...]] = field(default=None, compare=False)
    """The rows per logical expert and layer it was computed from (None: not known)."""

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def slots_per_rank(self) -> int:
        return len(self.layers[0][0]) if self.layers and self.layers[0] else 0

    @property
    def num_physical(self) -> int:
        return self.ep_size * self.slots_per_rank

    @property
    def replicas(self) -> int:
        """Extra slots per rank beyond the E / W of a placement without replicas."""
        return self.slots_per_rank - self.num_experts // self.ep_size

    @property
    def is_contiguous(self) -> bool:
        return self == contiguous(self.num_experts, self.ep_size, self.depth)  # source, rows aside

    def rank_experts(self, layer: int, rank: int) -> tuple[int, ...]:
        """Logical experts of ``rank``'s slots in ``layer`` (the weights it loads)."""
        return self.layers[layer][rank]

    def slot_experts(self, layer: int) -> tuple[int, ...]:
        """Logical expert of every physical slot of ``layer`` (length P)."""
        return tuple(e for rank in self.layers[layer] for e in rank)

    def validate(self, *, num_experts: int, ep_size: int, depth: int,
                 where: str = "moe.placement") -> "Placement":
        """Raise a one-line ``ConfigError`` (naming ``where`` and the fix) unless this placement
        fits a model of ``depth`` MoE layers and ``num_experts`` experts on ``ep_size`` ranks."""
        fix = "compute one for this run with `dice-ds placement`"
        if (self.num_experts, self.ep_size, self.depth) != (num_experts, ep_size, depth):
            raise ConfigError(
                f"{where}: the placement is for E={self.num_experts}, EP size {self.ep_size}, "
                f"{self.depth} layers but the run has E={num_experts}, EP size {ep_size}, "
                f"{depth} layers: {fix}")
        if num_experts % ep_size:
            raise ConfigError(f"{where}: E={num_experts} is not divisible by the EP size "
                              f"{ep_size}: choose an EP size that divides E")
        need = num_experts // ep_size
        for l, ranks in enumerate(self.layers):
            if len(ranks) != ep_size:
                raise ConfigError(f"{where}: layer {l} lists {len(ranks)} ranks, not {ep_size}: "
                                  f"{fix}")
            sizes = {len(r) for r in ranks}
            if sizes != {self.slots_per_rank}:
                raise ConfigError(f"{where}: layer {l} gives ranks {sorted(sizes)} slots; every "
                                  f"rank of every layer must hold {self.slots_per_rank} (megatron's "
                                  f"dispatcher needs equal local expert counts): {fix}")
            if self.slots_per_rank < need:
                raise ConfigError(f"{where}: {self.slots_per_rank} slots per rank cannot hold "
                                  f"E/W = {need} experts: {fix}")
            held = {e for r in ranks for e in r}
            bad = sorted(e for e in held if not 0 <= e < num_experts)
            if bad:
                raise ConfigError(f"{where}: layer {l} names experts {bad} outside 0..{num_experts - 1}: "
                                  f"{fix}")
            lost = sorted(set(range(num_experts)) - held)
            if lost:
                raise ConfigError(f"{where}: layer {l} places no slot of experts {lost}; every "
                                  f"expert needs at least one: {fix}")
        return self

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        out = {"format": FORMAT, "num_experts": self.num_experts, "ep_size": self.ep_size,
               "slots_per_rank": self.slots_per_rank, "source": self.source,
               "layers": [[list(r) for r in ranks] for ranks in self.layers]}
        if self.rows is not None:
            out["rows"] = [list(r) for r in self.rows]
            out["imbalance"] = [round(imbalance(r), 4) for r in rank_rows(self, self.rows)]
        return out

    @classmethod
    def from_json(cls, data, where: str = "moe.placement") -> "Placement":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{where}: not a placement file (needs \"format\": \"{FORMAT}\"): "
                              "write one with `dice-ds placement --out FILE`")
        try:
            layers = tuple(tuple(tuple(_int(e) for e in r) for r in ranks)
                           for ranks in data["layers"])
            rows = data.get("rows")
            return cls(num_experts=_int(data["num_experts"]), ep_size=_int(data["ep_size"]),
                       layers=layers, source=str(data.get("source", "")),
                       rows=None if rows is None else tuple(tuple(float(x) for x in r)
                                                            for r in rows))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: malformed placement file ({type(e).__name__}: {e}): "
                              "write one with `dice-ds placement --out FILE`") from None

    @classmethod
    def read(cls, path: str, where: str = "moe.placement") -> "Placement":
        try:
            with open(path) as fh:
                data = json.load(fh)
        except OSError as e:
            raise ConfigError(f"{where} {path}: cannot read it ({e.strerror}): give a placement "
                              f"file or one of {', '.join(CHOICES)}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} {path}: not JSON ({e.msg} at line {e.lineno}): give a "
                              "placement file written by `dice-ds placement`") from None
        return cls.from_json(data, f"{where} {path}")

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(self.to_json(), fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)


def _int(x) -> int:
    if type(x) is not int:
        raise ValueError(f"{x!r} is not an integer")
    return x


def contiguous(num_experts: int, ep_size: int, depth: int) -> Placement:
    """megatron's placement: rank r holds experts [r E/W, (r+1) E/W) in every layer."""
    per = num_experts // ep_size
    ranks = tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ep_size))
    return Placement(num_experts, ep_size, (ranks,) * depth, source=CONTIGUOUS)


# -- the algorithm ----------------------------------------------------------------------------

def replica_counts(rows_E: Sequence[float], ep_size: int, slots: int) -> list[int]:
    """Replicas k_e of each expert filling ``slots`` >= E slots: one each, then every extra slot
    to the expert with the largest share R_e / k_e (ties: lower id), at most one per rank."""
    k = [1] * len(rows_E)
    for _ in range(slots - len(rows_E)):
        open_ = [e for e in range(len(k)) if k[e] < ep_size]
        e = max(open_, key=lambda e: (rows_E[e] / k[e], -e))
        k[e] += 1
    return k


def pack(rows_E: Sequence[float], k_E: Sequence[int], ep_size: int) -> tuple[tuple[int, ...], ...]:
    """Longest-processing-time packing of the replicas (share R_e / k_e each) onto ``ep_size``
    ranks of sum(k) / W slots each, never two replicas of one expert on one rank, then pairwise
    swaps that lower the busiest rank while any does. Each rank's slots are sorted by expert id."""
    per = sum(k_E) // ep_size
    share = [rows_E[e] / k_E[e] for e in range(len(k_E))]
    items = sorted((e for e in range(len(k_E)) for _ in range(k_E[e])),
                   key=lambda e: (-share[e], e))
    ranks: list[list[int]] = [[] for _ in range(ep_size)]
    load = [0.0] * ep_size
    for e in items:
        free = [r for r in range(ep_size) if len(ranks[r]) < per]
        ok = [r for r in free if e not in ranks[r]]
        if not ok:  # only ranks that hold e have room: move another expert off one of them
            ok = [_make_room(ranks, free, e, per)]
            load = [sum(share[x] for x in r) for r in ranks]
        r = min(ok, key=lambda r: (load[r], r))
        ranks[r].append(e)
        load[r] += share[e]
    while _swap_down(ranks, share):
        pass
    return tuple(tuple(sorted(r)) for r in ranks)


def _swap_down(ranks: list[list[int]], share: list[float]) -> bool:
    """Swap one slot of the busiest rank with one of another rank where that lowers the larger
    of the two below the busiest rank's load; False when no swap does."""
    load = [sum(share[x] for x in r) for r in ranks]
    b = max(range(len(ranks)), key=lambda r: (load[r], -r))
    for o in sorted(range(len(ranks)), key=lambda r: (load[r], r)):
        for x in sorted(set(ranks[b])):
            for y in sorted(set(ranks[o])):
                if x in ranks[o] or y in ranks[b] or share[x] <= share[y]:
                    continue
                d = share[x] - share[y]
                if max(load[b] - d, load[o] + d) < load[b] - 1e-12:
                    ranks[b][ranks[b].index(x)] = y
                    ranks[o][ranks[o].index(y)] = x
                    return True
    return False


def _busiest(rows_E: Sequence[float], k_E: Sequence[int], ep_size: int) -> float:
    share = [rows_E[e] / k_E[e] for e in range(len(k_E))]
    return max(sum(share[e] for e in r) for r in pack(rows_E, k_E, ep_size))


MOVE_CANDIDATES = (3, 8)
"""``choose_replicas`` tries moving a replica to one of the 3 experts with the largest share from
one of the 8 whose share would stay the smallest (bounded work: E = 64 at 8 ranks in well under a
second per layer; all pairs took 9 s)."""


def choose_replicas(rows_E: Sequence[float], ep_size: int, slots: int) -> list[int]:
    """``replica_counts``, then moves of one replica from one expert to another while a move
    lowers the busiest rank of the packed placement (``pack``; candidates: ``MOVE_CANDIDATES``)."""
    k = replica_counts(rows_E, ep_size, slots)
    best = _busiest(rows_E, k, ep_size)
    n_to, n_from = MOVE_CANDIDATES
    for _ in range(4 * slots):
        to = sorted((e for e in range(len(k)) if k[e] < ep_size),
                    key=lambda e: (-rows_E[e] / k[e], e))[:n_to]
        fro = sorted((e for e in range(len(k)) if k[e] > 1),
                     key=lambda e: (rows_E[e] / (k[e] - 1), e))[:n_from]
        moves = [(d, r) for d in fro for r in to if r != d]
        for d, r in moves:
            k2 = list(k)
            k2[d] -= 1
            k2[r] += 1
            v = _busiest(rows_E, k2, ep_size)
            if v < best - 1e-12:
                k, best = k2, v
                break
        else:
            break
    return k


def _make_room(ranks: list[list[int]], free: list[int], e: int, per: int) -> int:
    """A full rank that lacks ``e`` gives one expert x (not on the free rank f) to f; returns it."""
    f = free[0]
    for r in range(len(ranks)):
        if len(ranks[r]) == per and e not in ranks[r]:
            for x in ranks[r]:
                if x not in ranks[f]:
                    ranks[r].remove(x)
                    ranks[f].append(x)
                    return r
    raise ValueError(f"cannot place a replica of expert {e}: too many replicas for {len(ranks)} "
                     "ranks")


def balanced(rows_LE: Sequence[Sequence[float]], ep_size: int, replicas: int = 0,
             source: str = "") -> Placement:
    """The placement minimising the busiest rank's rows, per layer, from ``rows_LE`` (rows per
    logical expert of each MoE layer, e.g. summed over a calibration's steps): ``replicas`` extra
    slots per rank go to the hottest experts (``replica_counts``), then LPT (``pack``)."""
    rows = tuple(tuple(float(x) for x in r) for r in rows_LE)
    e = len(rows[0])
    if e % ep_size:
        raise ConfigError(f"E={e} is not divisible by the EP size {ep_size}: choose an EP size "
                          "that divides E")
    slots = ep_size * (e // ep_size + replicas)
    if replicas < 0 or slots > e * ep_size:
        raise ConfigError(f"moe.replicas {replicas}: use 0..{e - e // ep_size} (each rank holds "
                          "each expert at most once)")
    layers = tuple(pack(r, choose_replicas(r, ep_size, slots), ep_size) for r in rows)
    return Placement(e, ep_size, layers, source=source, rows=rows)


def rank_rows(placement: Placement, rows_LE: Sequence[Sequence[float]]) -> list[list[float]]:
    """Rows each rank computes in each layer under ``placement`` (module doc: each of an expert's
    k replicas computes R_e / k of its R_e rows)."""
    out = []
    for l, rows_E in enumerate(rows_LE):
        k = [0] * placement.num_experts
        for e in placement.slot_experts(l):
            k[e] += 1
        out.append([sum(rows_E[e] / k[e] for e in set(rank))
                    for rank in placement.layers[l]])
    return out


def imbalance(rank_rows_W: Sequence[float]) -> float:
    """The busiest rank's rows over the mean (1.0: balanced; 0 rows: 1.0)."""
    mean = sum(rank_rows_W) / max(len(rank_rows_W), 1)
    return max(rank_rows_W) / mean if mean > 0 else 1.0


def rows_from_loads(loads: dict, num_layers: Optional[int] = None) -> list[list[float]]:
    """Rows per logical expert and layer, summed over steps, from a ``{"step,layer": [rows per
    expert]}`` table (a run.json's ``expert_rows``, or a bench ``.loads.json`` link where every
    rank holds one expert)."""
    by_layer: dict[int, list[float]] = {}
    for key, rows in loads.items():
        layer = int(str(key).split(",")[-1])
        acc = by_layer.setdefault(layer, [0.0] * len(rows))
        for e, x in enumerate(rows):
            acc[e] += float(x)
    depth = num_layers if num_layers is not None else max(by_layer) + 1
    missing = [l for l in range(depth) if l not in by_layer]
    if missing:
        raise ConfigError(f"the routing rows have no entry for layers {missing}: measure every "
                          "MoE layer")
    return [by_layer[l] for l in range(depth)]


# -- what a run measured ----------------------------------------------------------------------

def routing_counts(model) -> dict:
    """This rank's rows per logical expert and per physical slot of every MoE layer, summed over
    the calls so far (``DiTMoELayer.expert_rows_E`` / ``slot_rows_P``; empty lists before any)."""
    def rows(layer, name):
        value = getattr(layer, name, None)
        return [] if value is None else [int(x) for x in value.tolist()]

    layers = model.moe_layers()
    return {"expert_rows": [rows(layer, "expert_rows_E") for layer in layers],
            "slot_rows": [rows(layer, "slot_rows_P") for layer in layers]}


def run_record(placement, ep_size: int, per_rank: Sequence[dict]) -> dict:
    """run.json's ``expert_placement``: the placement used (``"contiguous"`` or its JSON), the
    rows per logical expert (all ranks), the rows each EP rank's slots computed and, per layer,
    the busiest EP rank's rows over the mean (``imbalance``; its max and median over layers).
    ``per_rank``: each rank's ``routing_counts``."""
    out: dict = {"placement": placement.to_json() if isinstance(placement, Placement)
                 else CONTIGUOUS}
    if not per_rank or not per_rank[0].get("expert_rows") or ep_size < 1:
        return out
    experts = [[sum(col) for col in zip(*layer)] for layer in
               zip(*(r["expert_rows"] for r in per_rank))]
    slots = [[sum(col) for col in zip(*layer)] for layer in zip(*(r["slot_rows"] for r in per_rank))]
    ranks = []
    for layer in slots:
        per = max(len(layer) // ep_size, 1)
        ranks.append([sum(layer[r * per:(r + 1) * per]) for r in range(ep_size)])
    ratios = sorted(imbalance(r) for r in ranks)
    out.update(expert_rows=experts, ep_rank_rows=ranks,
               imbalance=[round(imbalance(r), 4) for r in ranks],
               imbalance_max=round(ratios[-1], 4),
               imbalance_median=round(ratios[len(ratios) // 2], 4))
    return out


# -- routing onto physical slots --------------------------------------------------------------

class SlotRouting:
    """One layer's logical -> physical routing for the tokens of one EP rank (module doc)."""

    def __init__(self, slot_experts: Sequence[int], slots_per_rank: int, ep_rank: int):
        self.slot_experts = tuple(int(e) for e in slot_experts)
        self.num_physical = len(self.slot_experts)
        e_count = max(self.slot_experts) + 1
        replicas: list[list[int]] = [[] for _ in range(e_count)]
        for p, e in enumerate(self.slot_experts):
            replicas[e].append(p)
        self.local = [next((p for p in reps if p // slots_per_rank == ep_rank), -1)
                      for reps in replicas]
        self.replicas = replicas
        self.identity = self.slot_experts == tuple(range(e_count))
        self._tables: dict = {}

    def _on(self, device):
        if device not in self._tables:
            width = max(len(r) for r in self.replicas)
            table = torch.tensor([r + [r[0]] * (width - len(r)) for r in self.replicas],
                                 dtype=torch.long, device=device)
            self._tables[device] = (
                torch.tensor(self.slot_experts, dtype=torch.long, device=device),
                torch.tensor(self.local, dtype=torch.long, device=device), table,
                torch.tensor([len(r) for r in self.replicas], dtype=torch.long, device=device))
        return self._tables[device]

    def physical_slot_TE(self, num_tokens: int, device) -> torch.Tensor:
        """The physical slot each (token, logical expert) pair goes to: [T, E] int64."""
        _, local_E, table_EM, k_E = self._on(device)
        t_T1 = torch.arange(num_tokens, device=device).unsqueeze(1)
        e_1E = torch.arange(len(k_E), device=device).unsqueeze(0)
        choice_TE = table_EM[e_1E, t_T1 % k_E]  # replica t mod k of each expert
        return torch.where(local_E >= 0, local_E, choice_TE)

    def route(self, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor):
        """(probs [T, P], routing map [T, P]) of the logical ones: every routed (token, expert)
        entry moves to one slot of the expert, with its probability."""
        if self.identity:
            return probs_TE, routing_map_TE
        slots_P = self._on(routing_map_TE.device)[0]
        slot_TE = self.physical_slot_TE(routing_map_TE.shape[0], routing_map_TE.device)
        map_TP = routing_map_TE.new_zeros(routing_map_TE.shape[0], self.num_physical)
        map_TP.scatter_(1, slot_TE, routing_map_TE)
        return probs_TE.index_select(1, slots_P), map_TP

    def row_experts(self, map_TP: torch.Tensor) -> torch.Tensor:
        """Logical expert of every permuted row (megatron's permutation is slot-major, tokens
        ascending) of a physical routing map: [R] int64."""
        slots = torch.arange(map_TP.shape[1], device=map_TP.device)
        slot_R = torch.repeat_interleave(slots, map_TP.sum(dim=0))
        return slot_R if self.identity else self._on(map_TP.device)[0][slot_R]


def placement_setting(setting: str, replicas: int, *, num_experts: int, ep_size: int, depth: int):
    """What ``moe.placement`` / ``moe.replicas`` ask for, checked before any process group (one
    ``ConfigError`` line each): None (megatron's contiguous placement), ``BALANCED`` (computed at
    start-up) or the placement file's ``Placement``, validated against the run."""
    if setting == CONTIGUOUS:
        if replicas:
            raise ConfigError(f"--expert-replicas {replicas} needs --expert-placement balanced "
                              "(the contiguous placement has no replicas): add it or drop "
                              "--expert-replicas")
        return None
    if ep_size <= 1:
        raise ConfigError(f"--expert-placement {setting} places experts on expert-parallel ranks: "
                          "add --ep (and --ep-size), or drop --expert-placement")
    if setting == BALANCED:
        check_replicas(replicas, num_experts, ep_size)
        return BALANCED
    where = f"--expert-placement {setting}"
    placement = Placement.read(setting, "--expert-placement").validate(
        num_experts=num_experts, ep_size=ep_size, depth=depth, where=where)
    if replicas and replicas != placement.replicas:
        raise ConfigError(f"{where} has {placement.replicas} extra slots per rank but "
                          f"--expert-replicas {replicas} was given: drop --expert-replicas (the "
                          "file decides)")
    return None if placement.is_contiguous else placement


def replicas_of(placement, replicas: int) -> int:
    """Extra expert slots per rank of a ``placement_setting`` answer (``replicas`` when it is
    still to be computed)."""
    return placement.replicas if isinstance(placement, Placement) else (
        replicas if placement == BALANCED else 0)


def check_replicas(replicas: int, num_experts: int, ep_size: int) -> None:
    """``moe.replicas`` fits: 0..E - E/W extra slots per rank (a rank holds an expert once)."""
    most = num_experts - num_experts // max(ep_size, 1)
    if not 0 <= replicas <= most:
        raise ConfigError(f"moe.replicas {replicas} (--expert-replicas): use 0..{most} extra "
                          f"slots per rank for E={num_experts} at EP size {ep_size}")


def slots_per_rank(num_experts: int, ep_size: int, replicas: int) -> int:
    return num_experts // max(ep_size, 1) + replicas

