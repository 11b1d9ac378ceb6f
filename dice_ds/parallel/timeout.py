"""The run's collective timeout in seconds: ``pg_timeout_seconds``, its one reader.

``--pg-timeout``, else ``$DICE_DS_PG_TIMEOUT`` (seconds), else the legacy ``$DICE_DS_PG_TIMEOUT_MIN``
(minutes), else 300 s. A value that is not a number, not finite, not positive or above
``MAX_TIMEOUT_SECONDS`` is one ``ConfigError`` line naming where it came from. Imports no torch:
``dice_ds.sample.entry`` checks it before the heavy imports; ``dice_ds.parallel.groups`` applies it
to every process group.
"""

from __future__ import annotations

import math
import os

from dice_ds.config import ConfigError
from dice_ds.ds_config import MAX_PG_TIMEOUT

DEFAULT_TIMEOUT_SECONDS = 300.0
MAX_TIMEOUT_SECONDS = MAX_PG_TIMEOUT
"""The settings tree's bound of ``--pg-timeout`` (a week), for the environment's values too."""


def _seconds(text: str, where: str, scale: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}={text!r} is not a number: give the collective timeout in "
                          f"{'minutes' if scale == 60 else 'seconds'} (e.g. 300), or unset it") from None
    return value * scale


def pg_timeout_seconds(seconds: float | None = None) -> float:
    """The collective timeout: ``seconds`` (``--pg-timeout``), else ``$DICE_DS_PG_TIMEOUT`` (s), else
    ``$DICE_DS_PG_TIMEOUT_MIN`` (minutes, legacy), else 300 s; raises ConfigError (one line)."""
    if seconds is not None:
        value, where = float(seconds), "--pg-timeout"
    elif os.environ.get("DICE_DS_PG_TIMEOUT"):
        where = "DICE_DS_PG_TIMEOUT"
        value = _seconds(os.environ[where], where, 1.0)
    elif os.environ.get("DICE_DS_PG_TIMEOUT_MIN"):
        where = "DICE_DS_PG_TIMEOUT_MIN"
        value = _seconds(os.environ[where], where, 60.0)
    else:
        return DEFAULT_TIMEOUT_SECONDS
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} must be a positive number of seconds, got {value:g}")
    if value > MAX_TIMEOUT_SECONDS:
        raise ConfigError(f"{where} {value:g} s is above the maximum {MAX_TIMEOUT_SECONDS:g} s (a "
                          "week: longer is a hang); give fewer seconds")
    return value
