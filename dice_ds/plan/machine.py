"""Whether a calibration describes the machine it is used for: ``dice-ds plan`` says when not.

A plan calibrated on one machine (``--calibration``, ``--bench-json``, ``--emulation-from``: bench
JSONs whose ``meta.machine`` is ``dice_ds.bench.probe.machine``) and applied to another predicts
that machine's compute and network path with the first one's costs. Owns the checks and their
one-line notes (``notes``): a different CPU model, a different core count, a bench that recorded
no machine (made before ``meta.machine`` existed), and -- with a validation -- a compute probe that
disagrees: the DP row predicted from the calibration against the DP row measured, off by more than
``COMPUTE_TOLERANCE`` (DP exchanges nothing, so the difference is the machines' compute, or other
work on one of them).
"""

from __future__ import annotations

COMPUTE_TOLERANCE = 0.15
"""|predicted - measured| / measured of the DP row above which the calibration's compute is
called different (the N-rank plan's own target is 15 %, issue 22)."""


def _machine(bench: dict) -> dict | None:
    return (bench.get("meta") or {}).get("machine")


def differences(calib: dict, target: dict | None) -> list[str]:
    """What differs between the machine ``calib`` ran on and ``target`` (a ``machine()`` dict;
    None: unknown)."""
    mine = _machine(calib)
    if mine is None:
        return ["records no machine (a bench from before meta.machine): whether it ran on this "
                "machine cannot be checked"]
    if target is None:
        return []
    out = []
    if mine.get("cpu_model") != target.get("cpu_model"):
        out.append(f"CPU {mine.get('cpu_model')!r}, not {target.get('cpu_model')!r}")
    if mine.get("cores") != target.get("cores"):
        out.append(f"{mine.get('cores')} cores, not {target.get('cores')}")
    return out


def compute_disagreement(val: list[dict]) -> list[str]:
    """One note per link whose DP row (predicted from the calibration) is off by more than
    ``COMPUTE_TOLERANCE``."""
    out = []
    for r in val:
        if r.get("mode") == "dp" and "error_pct" in r and not r.get("calibration"):
            if abs(r["error_pct"]) > 100 * COMPUTE_TOLERANCE:
                out.append(f"the compute probe disagrees: DP on {r['link']} predicted "
                           f"{r['predicted']:.2f} s from the calibration, measured "
                           f"{r['measured']:.2f} s ({r['error_pct']:+.0f} %)")
    return out


def notes(sources: dict[str, dict], target: dict | None, val: list[dict] | None = None) -> list[str]:
    """Lines for ``dice-ds plan``: each calibration source (flag -> bench JSON) that may not
    describe ``target`` (the validated bench's machine, or this machine's for a prediction), and
    the compute disagreement of a validation."""
    out = []
    for flag, bench in sources.items():
        for why in differences(bench, target):
            out.append(f"{flag} ran on another machine: {why}; its costs may not hold here "
                       "(calibrate with a 2-rank dice-ds bench on this machine)"
                       if not why.startswith("records") else f"{flag} {why}")
    if val:
        out += compute_disagreement(val)
    return out
