"""The one table of named parallel modes: a short key, a display name and the ``dice-ds sample`` flags.

Owns ``MODES`` (used by ``dice-ds eval --sweep`` for the quality table and by ``dice-ds bench`` for
the speed table) and ``by_key``. A mode is only a set of flags: validation stays with the sampler
(``dice_ds.options``), so a mode the sampler rejects is reported as not available by its caller.
"""

from __future__ import annotations

from dataclasses import dataclass

INTERWEAVED = ("--ep", "--ep-async", "--ep-async-pipeline")


@dataclass(frozen=True)
class Mode:
    """One row: a short key (CLI), a name (tables) and the ``dice-ds sample`` flags that select it."""

    key: str
    name: str
    flags: tuple[str, ...]
    note: str = ""


def _skip(strategy: str, async_mode: str = "all") -> tuple[str, ...]:
    return INTERWEAVED + ("--ep-async-mode", async_mode, "--ep-async-noskip-step", "2",
                          "--ep-async-skip-strategy", strategy)


DICE_FLAGS = _skip("low", "shallow")

MODES: tuple[Mode, ...] = (
    Mode("dp", "DP", (), "no expert parallelism; every rank holds all experts"),
    Mode("sync", "sync EP", ("--ep",), "the reference of the PSNR column"),
    Mode("displaced", "displaced EP", ("--ep", "--ep-async", "--ep-async-mode", "all"),
         "2-step stale"),
    Mode("interweaved", "interweaved", INTERWEAVED + ("--ep-async-mode", "all"),
         "1-step stale, all layers"),
    Mode("iw-deep-sync", "interweaved + deep sync", INTERWEAVED + ("--ep-async-mode", "shallow"),
         "async layers l < L/2, deep layers sync (DICE's selective sync)"),
    Mode("iw-shallow-sync", "interweaved + shallow sync",
         INTERWEAVED + ("--ep-async-mode", "deep"), "async layers l >= L/2"),
    Mode("iw-staggered", "interweaved + staggered sync",
         INTERWEAVED + ("--ep-async-mode", "interleaved"), "async even layers"),
    Mode("iw-low", "interweaved + cond. comm low", _skip("low"), "P = 2, skip the lower-score slot"),
    Mode("iw-high", "interweaved + cond. comm high", _skip("high"),
         "P = 2, skip the higher-score slot"),
    Mode("iw-rand", "interweaved + cond. comm rand", _skip("rand"), "P = 2, skip a random slot"),
    Mode("dice", "DICE", DICE_FLAGS, "interweaved + deep sync + low skip (P = 2)"),
    Mode("dice-bf16", "DICE + bf16 payload", DICE_FLAGS + ("--a2a-dtype", "bf16"),
         "DICE with a bf16 all-to-all payload"),
    Mode("sp", "sync SP", ("--sp",), "patch parallelism, K/V all-gathered every layer (exact)"),
    Mode("sp-async", "displaced SP", ("--sp", "--sp-async"),
         "DistriFusion-style: remote K/V 1 step stale, own K/V fresh"),
    Mode("ep-sp", "sync EP x sync SP", ("--ep", "--sp", "--sp-size", "2"),
         "mesh of EP groups of W/2 ranks x SP pairs (4 ranks: EP 2 x SP 2); exact"),
    Mode("hybrid", "DICE x displaced SP", DICE_FLAGS + ("--sp", "--sp-async", "--sp-size", "2"),
         "DICE over EP groups of W/2 ranks x displaced SP pairs"),
)

MESH_MODES = ("ep-sp", "hybrid")
"""Modes that need an EP x SP mesh: at least 4 ranks."""

_BY_KEY = {}
for _m in MODES:
    if _m.key in _BY_KEY:
        raise ValueError(f"duplicate mode key {_m.key!r}")
    _BY_KEY[_m.key] = _m


def by_key(key: str) -> Mode:
    if key not in _BY_KEY:
        raise KeyError(f"unknown mode {key!r}: choose from {', '.join(_BY_KEY)}")
    return _BY_KEY[key]
