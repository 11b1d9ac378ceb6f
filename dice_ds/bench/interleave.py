"""A/B/C timing in rotating order, for the single-process benchmarks (scripts/bench_experts.py,
scripts/gpu_check_steps.py).

Owns ``interleaved``: warm-up calls, then rounds in which every variant runs once, the order
rotating from round to round, so that load that drifts over the run spreads over all variants.
The clock (wall time on CPU, CUDA events on a GPU) is the caller's.
"""

from __future__ import annotations

from typing import Callable


def interleaved(fns: dict, warmup: int, rounds: int,
                clock: Callable[[Callable], float]) -> dict[str, list[float]]:
    """Seconds per call of each ``fns`` entry (as ``clock(fn)`` measures one call), ``rounds``
    rounds after ``warmup`` untimed calls of each."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(clock(fns[n]))
    return times
