"""Policy search for ``dice-ds tune``: the fastest predicted schedule within a quality budget.

Owns ``Policy`` (EP mode, async layer set -- any subset --, warm-up, cool-down, strided sync, skip
period with the 'low' strategy, overlapped sync calls; serialised once, as settings, from which its
``ParallelPlan``, config file and flags are made) and ``search``.

Search: for every point of a small grid over (mode, warm-up, cool-down, stride, period, overlap), the
async layer set is chosen either exhaustively (depth <= ``EXHAUSTIVE_MAX``: every subset) or
greedily: starting from no async layer, add the layer with the largest predicted time saved per
unit of added deviation (``dice_ds.tune.quality.deviation``) whose result stays within the
budget; stop when no layer both fits and saves time. The answer is the feasible policy with the
largest predicted speed-up over sync EP (ties: smaller deviation). Only the 'low' skip strategy is
searched: it is the measured best (docs/quality.md: low < rand < high). Overlapped sync calls
(``ep_overlap``, dice_ds/moe/halves.py) compute what a sync call computes, so they change a
policy's speed, never its deviation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from dice_ds.options import flags_of, from_overrides, plan_of
from dice_ds.parallel.plan import ParallelPlan

EXHAUSTIVE_MAX = 10


@dataclass(frozen=True)
class Policy:
    """A point of the search; ``settings`` is its one serialisation (keyword values of the settings
    tree), from which its plan, its config file and its flags are made."""

    mode: str = "interweaved"
    layers: tuple[int, ...] = ()
    warmup: int = 0
    cooldown: int = 0
    strided: int = 0
    period: int = 1
    overlap: bool = False
    """Sync calls as two overlapped micro-batches (``ep_overlap``)."""

    def settings(self) -> dict:
        """The policy as settings (``dice_ds.ds_config`` keyword values): sync EP plus, with async
        layers, the async knobs, and the 'low' skip with a period > 1."""
        out: dict = {"ep": True}
        if self.layers:
            out.update(ep_async=True, ep_async_pipeline=self.mode == "interweaved",
                       ep_async_layers=",".join(map(str, self.layers)))
            for key, value in (("ep_async_warm_up", self.warmup),
                               ("ep_async_cool_down", self.cooldown),
                               ("strided_sync", self.strided)):
                if value:
                    out[key] = value
        if self.period > 1:
            out.update(ep_async_noskip_step=self.period, ep_async_skip_strategy="low")
        if self.overlap:
            out["ep_overlap"] = True
        return out

    def plan(self, ep_size: int) -> ParallelPlan:
        """The (unvalidated) plan of the settings on an EP group of ``ep_size`` ranks."""
        return plan_of(from_overrides({**self.settings(), "ep_size": ep_size}), ep_size)

    def flags(self) -> list[str]:
        """The settings as ``dice-ds sample`` flags (display)."""
        return flags_of(self.settings())


SMALL_GRID = {"mode": ("interweaved", "displaced"), "warmup": (0, 1, 2, 4), "cooldown": (0, 2),
              "strided": (0, 5), "period": (1, 2, 4), "overlap": (False, True)}
LARGE_GRID = {"mode": ("interweaved",), "warmup": (0, 1, 2), "cooldown": (0,), "strided": (0,),
              "period": (1, 2), "overlap": (False, True)}

Evaluate = Callable[[Policy], tuple[float, float]]
"""policy -> (predicted speed-up over sync EP, deviation D)."""


def _greedy(base: Policy, depth: int, ev, d_max: float) -> list[tuple[Policy, float, float]]:
    cur = base
    cur_s, cur_d = ev(cur)
    seen = [(cur, cur_s, cur_d)]
    while True:
        best = None
        for l in range(depth):
            if l in cur.layers:
                continue
            cand = Policy(**{**cur.__dict__, "layers": tuple(sorted(cur.layers + (l,)))})
            s, d = ev(cand)
            seen.append((cand, s, d))
            if d > d_max or s <= cur_s:
                continue
            score = (s - cur_s) / max(d - cur_d, 1e-12)
            if best is None or score > best[0]:
                best = (score, cand, s, d)
        if best is None:
            return seen
        _, cur, cur_s, cur_d = best


def distinct(points: list) -> list:
    """(policy, speed-up, D) points with one per distinct flag set (grid points without async
    layers differ only in knobs that then do nothing)."""
    return list({" ".join(p.flags()): (p, s, d) for p, s, d in points}.values())


def search(depth: int, ev: Evaluate, d_max: float, grid: dict | None = None,
           tolerance: float = 0.0) -> tuple[tuple[Policy, float, float] | None, list]:
    """(best feasible (policy, speed-up, D) or None, every evaluated point).

    Best: among the feasible policies whose predicted speed-up is within ``tolerance`` (a
    fraction) of the fastest one, the one with the smallest D (then the faster). With 0 it is
    simply the fastest; a few per cent says that the speed model does not resolve smaller
    differences, so they are spent on quality."""
    grid = grid or (SMALL_GRID if depth <= EXHAUSTIVE_MAX else LARGE_GRID)
    cache: dict = {}

    def cached(p: Policy):
        if p not in cache:
            cache[p] = ev(p)
        return cache[p]

    seen = []
    keys = ("mode", "warmup", "cooldown", "strided", "period")
    for *point, ov in itertools.product(*(grid[k] for k in keys), grid.get("overlap", (False,))):
        mode, w, c, s, period = point
        base = Policy(mode, (), w, c, s, period, ov)
        if depth <= EXHAUSTIVE_MAX:
            for r in range(0, depth + 1):
                for layers in itertools.combinations(range(depth), r):
                    if ov and cached(Policy(mode, layers, w, c, s, period))[1] > d_max:
                        continue  # same deviation as without overlap: infeasible too
                    p = Policy(mode, layers, w, c, s, period, ov)
                    seen.append((p, *cached(p)))
        else:
            seen += _greedy(base, depth, cached, d_max)
    feasible = [x for x in seen if x[2] <= d_max]
    if not feasible:
        return None, seen
    top = max(x[1] for x in feasible)
    near = [x for x in feasible if x[1] >= top * (1 - tolerance) - 1e-12]
    return min(near, key=lambda x: (x[2], -x[1])), seen
