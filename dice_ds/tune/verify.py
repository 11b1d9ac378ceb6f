"""``dice-ds tune --verify K``: measure the model's shortlist with ``dice-ds bench`` and choose on time.

Owns the shortlist and its measurement. ``dice-ds plan`` is validated to about 10 % on the emulated
links (docs/plan.md), while the best feasible policies of a search are often predicted within a
few per cent of each other, so the model alone can rank them wrongly. The shortlist is the Pareto
front (faster, or smaller deviation D) of the distinct feasible policies predicted within
``window`` of the fastest one, thinned to K points evenly spaced along it (the fastest and the
smallest-D always kept), plus the search's own choice. One ``dice-ds bench`` invocation then
runs sync EP and every candidate, interleaved, on the tuning link; the choice is the measured
fastest, with measured speed-ups within ``tolerance`` of it counted as ties that the smaller D
wins.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dice_ds.ds_config import convert_flat, validate_data
from dice_ds.tune.search import distinct


def shortlist(seen: list, d_max: float, window: float, k: int, keep=None) -> list:
    """(policy, predicted speed-up, D) of the thinned Pareto front, fastest first; ``keep`` (the
    search's own choice) is always in it."""
    unique = [x for x in distinct(seen) if x[2] <= d_max]
    if not unique:
        return []
    top = max(s for _, s, _ in unique)
    near = sorted((x for x in unique if x[1] >= top * (1 - window)),
                  key=lambda x: (-x[1], x[2]))
    front, best_d = [], float("inf")
    for x in near:                       # by speed-up, descending: keep each new lowest D
        if x[2] < best_d - 1e-12:
            front.append(x)
            best_d = x[2]
    if len(front) > k:
        picks = sorted({round(i * (len(front) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
        front = [front[i] for i in picks]
    if keep is not None and all(x[0] != keep[0] for x in front):
        front = sorted([*front, keep], key=lambda x: (-x[1], x[2]))
    return front


def measure(cands: list, *, model: str, ckpt: str, image_size: int, steps: int, batch: int,
            link: str, rounds: int, out: str | None = None, log=print) -> dict:
    """Run the bench on the candidates; returns {'bench': path, 'speedup': {policy: measured}}."""
    work = Path(out or tempfile.mkdtemp(prefix="dice_tune_verify."))
    work.mkdir(parents=True, exist_ok=True)
    args, names = [], {}
    for i, (p, _, _) in enumerate(cands):
        name = f"c{i}"
        data = {"description": " ".join(p.flags()), **convert_flat(p.settings())}
        path = work / f"{name}.json"
        validate_data(data, str(path))
        path.write_text(json.dumps(data, indent=2) + "\n")
        args += ["--mode-config", f"{name}={path}"]
        names[name] = p
    cmd = [sys.executable, "-m", "dice_ds.cli", "bench", "--links", link, "--modes",
           ",".join(["sync", *names]), *args, "--rounds", str(rounds), "--model", model,
           "--ckpt", ckpt, "--image-size", str(image_size), "--steps", str(steps),
           "--batch", str(batch), "--out", str(work / "bench")]
    log(f"[tune] verifying {len(cands)} candidates: {' '.join(cmd[2:])}")
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    bench = work / "bench" / "bench.json"
    if r.returncode != 0 or not bench.is_file():
        raise RuntimeError(f"dice-ds bench for --verify failed (exit {r.returncode}); "
                           f"logs in {work / 'bench'}")
    rows = json.loads(bench.read_text())["rows"]
    speed = {names[x["mode"]]: x["speedup"] for x in rows
             if x["mode"] in names and x["link"] == link and x.get("speedup")}
    return {"bench": str(bench), "speedup": speed}


def choose(cands: list, measured: dict, tolerance: float):
    """The measured fastest candidate, ties within ``tolerance`` to the smaller D; None if none
    was measured."""
    got = [(p, measured[p], d) for p, _, d in cands if p in measured]
    if not got:
        return None
    top = max(s for _, s, _ in got)
    return min((x for x in got if x[1] >= top * (1 - tolerance) - 1e-12),
               key=lambda x: (x[2], -x[1]))
