"""The one table of named parallel modes: a short key, a display name and the mode's settings.

Owns ``MODES`` (used by ``dice-ds eval --sweep`` for the quality table, by ``dice-ds bench`` for
the speed table, by ``dice-ds plan`` for its predictions and by the golden-latents test) and
``by_key``. A mode is a partial settings tree written as keyword values of ``dice_ds.ds_config``
(``{"ep": True, "ep_async": True}``): it is merged over a job's settings
(``dice_ds.options.from_overrides``); ``Mode.flags`` is the same as ``dice-ds sample`` flags, for the
commands a sweep launches and for tables. Validation stays with the settings, so a mode the sampler
rejects is reported as not available by its caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dice_ds.options import flags_of

INTERWEAVED = {"ep": True, "ep_async": True, "ep_async_pipeline": True}


@dataclass(frozen=True)
class Mode:
    """One row: a short key (CLI), a name (tables) and the settings that select it."""

    key: str
    name: str
    settings: dict = field(default_factory=dict)
    note: str = ""
    same_as: str = ""
    """The mode whose outputs this one equals up to float rounding (it changes only how the work
    is scheduled); tests/multirank/test_golden.py compares it with that mode's golden latents."""

    @property
    def flags(self) -> tuple[str, ...]:
        """The settings as ``dice-ds sample`` flags (generated; commands and display only)."""
        return tuple(flags_of(self.settings))


def _skip(strategy: str, async_mode: str = "all") -> dict:
    return {**INTERWEAVED, "ep_async_mode": async_mode, "ep_async_noskip_step": 2,
            "ep_async_skip_strategy": strategy}


DICE = _skip("low", "shallow")
"""DICE: interweaved EP, shallow layers async (the paper's deep sync), low-score slot skipped."""

MODES: tuple[Mode, ...] = (
    Mode("dp", "DP", {}, "no expert parallelism; every rank holds all experts"),
    Mode("sync", "sync EP", {"ep": True}, "the reference of the PSNR column"),
    Mode("displaced", "displaced EP", {"ep": True, "ep_async": True, "ep_async_mode": "all"},
         "2-step stale"),
    Mode("interweaved", "interweaved", {**INTERWEAVED, "ep_async_mode": "all"},
         "1-step stale, all layers"),
    Mode("iw-deep-sync", "interweaved + deep sync", {**INTERWEAVED, "ep_async_mode": "shallow"},
         "async layers l < L/2, deep layers sync (DICE's selective sync)"),
    Mode("iw-shallow-sync", "interweaved + shallow sync",
         {**INTERWEAVED, "ep_async_mode": "deep"}, "async layers l >= L/2"),
    Mode("iw-staggered", "interweaved + staggered sync",
         {**INTERWEAVED, "ep_async_mode": "interleaved"}, "async even layers"),
    Mode("iw-low", "interweaved + cond. comm low", _skip("low"), "P = 2, skip the lower-score slot"),
    Mode("iw-high", "interweaved + cond. comm high", _skip("high"),
         "P = 2, skip the higher-score slot"),
    Mode("iw-rand", "interweaved + cond. comm rand", _skip("rand"), "P = 2, skip a random slot"),
    Mode("dice", "DICE", DICE, "interweaved + deep sync + low skip (P = 2)"),
    Mode("dice-bf16", "DICE + bf16 payload", {**DICE, "a2a_dtype": "bf16"},
         "DICE with a bf16 all-to-all payload"),
    Mode("sync-ov", "sync EP overlapped", {"ep": True, "ep_overlap": True},
         "two micro-batches (CFG halves): one's all-to-all in flight while the other's experts "
         "compute; fresh", same_as="sync"),
    Mode("dice-ov", "DICE + overlapped sync calls", {**DICE, "ep_overlap": True},
         "DICE whose sync calls (deep layers, first step) are overlapped", same_as="dice"),
    Mode("sp", "sync SP", {"sp": True}, "patch parallelism, K/V all-gathered every layer (exact)"),
    Mode("sp-async", "displaced SP", {"sp": True, "sp_async": True},
         "DistriFusion-style: remote K/V 1 step stale, own K/V fresh"),
    Mode("ep-sp", "sync EP x sync SP", {"ep": True, "sp": True, "sp_size": 2},
         "mesh of EP groups of W/2 ranks x SP pairs (4 ranks: EP 2 x SP 2); exact"),
    Mode("hybrid", "DICE x displaced SP", {**DICE, "sp": True, "sp_async": True, "sp_size": 2},
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


def mode_settings(mode: str, ep: int, sp: int) -> dict:
    """The settings of ``mode`` at these group sizes (sizes given for a mesh)."""
    settings = dict(by_key(mode).settings)
    if ep > 1 and sp > 1:
        settings.update(ep_size=ep, sp_size=sp)
    return settings
