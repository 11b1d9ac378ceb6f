"""Quality proxy for ``dice-ds tune``: a schedule's predicted deviation from sync EP, and its PSNR.

Owns ``deviation(sched, table)`` and ``PsnrFit``. The deviation D sums, over every (step, layer)
call, the relative error the schedule substitutes there, read from the sensitivity table
(``dice_ds.tune.sensitivity``):

- a stale call: ``stale[k][l][i]`` with k the age of the outputs it returns, the schedule's answer
  (``Schedule.call(i, l).age``: 1 for interweaved and for displaced right after a sync step, 2 for
  displaced otherwise; docs/design.md);
- a skipping call ('low' strategy): its low slot's output comes from the layer's last exchange
  that sent every slot, ``age`` steps ago (1 with P = 2, up to P - 1 with period P): it adds
  ``low_share[l] * (err(age) - err(k))``, err(k) = ``stale[k][l][i]`` (k > 2: linear from k = 2),
  k = the call's own staleness (0 for a sync call). With P = 2 a 1-step stale call adds nothing:
  measured, interweaved with and without low skipping are 38.22 / 38.23 dB PSNR vs sync
  (docs/quality.md).

``PsnrFit`` maps D to PSNR vs sync: PSNR = a - b * 10 log10(D), least squares over measured rows
of docs/quality.json (the 'low'-skip and no-skip EP modes); the fit's residuals are reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dice_ds.schedule import Schedule


def _err(stale: dict, l: int, i: int, k: int) -> float:
    """Relative error of a k-step old routed output of layer l at step i (k > 2: linear in k from
    the 2-step value; only 1 and 2 are measured)."""
    if k <= 2:
        return stale[str(k)][l][i]
    return stale["2"][l][i] * k / 2


def deviation(sched: Schedule, table: dict) -> float:
    stale, share = table["stale"], table["low_share"]
    S = sched.num_steps
    if S != table["steps"]:
        raise ValueError(f"sensitivity table has {table['steps']} steps, the schedule {S}")
    total, last_full = 0.0, S
    for i in range(S, 0, -1):
        age = last_full - i          # steps since the last exchange that sent every slot
        for l in range(sched.depth):
            k = sched.call(i, l).age  # the schedule's answer: 0 for a sync call
            if k:
                total += _err(stale, l, i, k)
            if sched.skips(i, l):
                total += share[l] * max(0.0, _err(stale, l, i, age) - (
                    _err(stale, l, i, k) if k else 0.0))
        if not (sched.skips(i, 0) if sched.depth else False):
            last_full = i
    return total


@dataclass(frozen=True)
class PsnrFit:
    a: float
    b: float
    residuals: tuple[tuple[str, float, float], ...] = ()
    """(mode, measured PSNR, fitted PSNR) of the points fitted."""

    def psnr(self, d: float) -> float:
        return math.inf if d <= 0 else self.a - self.b * 10 * math.log10(d)

    def max_deviation(self, psnr_db: float) -> float:
        """The largest D whose predicted PSNR is still >= ``psnr_db``."""
        return 10 ** ((self.a - psnr_db) / (10 * self.b))

    @classmethod
    def fit(cls, points: list[tuple[str, float, float]]) -> "PsnrFit":
        """points: (mode, D, measured PSNR dB); needs >= 2 points with D > 0."""
        pts = [(m, 10 * math.log10(d), p) for m, d, p in points if d > 0 and math.isfinite(p)]
        if len(pts) < 2:
            raise ValueError("PSNR fit needs at least two measured modes with staleness")
        n = len(pts)
        mx = sum(x for _, x, _ in pts) / n
        my = sum(y for _, _, y in pts) / n
        sxx = sum((x - mx) ** 2 for _, x, _ in pts)
        slope = sum((x - mx) * (y - my) for _, x, y in pts) / sxx if sxx > 0 else -2.0
        b = -slope
        a = my + b * mx
        fit = cls(a, b)
        return cls(a, b, tuple((m, p, fit.psnr(10 ** (x / 10))) for m, x, p in pts))
