"""The multi-node checks: which runs a cluster test makes, and what their samples must satisfy.

Shared by the emulated-node tests (tests/cluster, every launcher in network-namespace nodes) and a
real allocation (``sbatch scripts/cluster_test.sbatch``), so both run the same jobs and the same
assertions.

    python scripts/cluster_check.py flags MODE         # the dice_ds.sample arguments of MODE
    python scripts/cluster_check.py modes              # the mode names, one a line
    python scripts/cluster_check.py check OUT L1 [L2]  # OUT/reference and OUT/<launcher>/<mode>

Layout under OUT: ``reference/`` is one plain process (data parallel, world size 1); each
launcher's run of a mode is ``<launcher>/<mode>/``. Checks: every run finished its samples, all
finite; the exact modes (DP, sync EP) equal the one-process reference bit for bit; a stale mode
(DICE, displaced SP) gives the same samples through every launcher (same world, same layout).
Exit code 0 when every check passes, 1 otherwise; one line per check.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

COMMON = ["--model", "debug", "--init", "random", "--vae", "none", "--num-sampling-steps", "4",
          "--num-fid-samples", "8", "--per-proc-batch-size", "2"]
DICE = ["--ep", "--ep-async", "--ep-async-pipeline", "--ep-async-mode", "shallow",
        "--ep-async-noskip-step", "2", "--ep-async-skip-strategy", "low"]
MODES = {"dp": [], "ep-sync": ["--ep"], "dice": DICE, "sp-async": ["--sp", "--sp-async"]}
EXACT = ("dp", "ep-sync")
"""Modes whose samples equal one process's bit for bit (no stale activation anywhere)."""


def flags(mode: str) -> list[str]:
    return COMMON + MODES[mode]


def _latents(path: str) -> np.ndarray:
    return np.load(os.path.join(path, "latents.npz"))["arr_0"]


def check(out: str, runs: list[tuple[str, str]]) -> list[tuple[bool, str]]:
    """(passed, line) of every check on the (launcher, mode) runs under ``out``."""
    results = []
    ref = _latents(os.path.join(out, "reference"))
    for mode in MODES:
        first = None
        for launcher in [launcher for launcher, m in runs if m == mode]:
            run = os.path.join(out, launcher, mode)
            name = f"{launcher}/{mode}"
            try:
                info = json.load(open(os.path.join(run, "run.json")))
                z = _latents(run)
            except (OSError, ValueError, KeyError) as e:
                results.append((False, f"{name}: no samples ({e})"))
                continue
            done = info.get("samples_run") == len(ref) and z.shape == ref.shape
            results.append((done and bool(np.isfinite(z).all()),
                            f"{name}: {info.get('samples_run')} samples on "
                            f"{info.get('world_size')} ranks, finite"))
            if mode in EXACT:
                same = z.shape == ref.shape and np.array_equal(z, ref)
                results.append((same, f"{name}: equals one process bit for bit"))
            elif first is None:
                first = (launcher, z)
            else:
                same = z.shape == first[1].shape and np.array_equal(z, first[1])
                results.append((same, f"{name}: equals {first[0]}/{mode} bit for bit"))
    return results


def main(argv: list[str]) -> int:
    if argv[:1] == ["flags"] and len(argv) == 2:
        print(" ".join(flags(argv[1])))
        return 0
    if argv[:1] == ["modes"]:
        print("\n".join(MODES))
        return 0
    if argv[:1] == ["check"] and len(argv) >= 3:
        results = check(argv[1], [(launcher, mode) for launcher in argv[2:] for mode in MODES])
        for ok, line in results:
            print(("ok    " if ok else "FAIL  ") + line)
        print(f"{sum(ok for ok, _ in results)} passed, {sum(not ok for ok, _ in results)} failed")
        return 0 if all(ok for ok, _ in results) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
