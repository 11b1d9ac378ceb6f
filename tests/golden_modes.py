"""Golden latents of every parallel mode: the harness behind ``tests/golden/*.npz``.

The fixtures were written by ``python tests/golden_modes.py`` at the commit before the issue "One
place for each decision" changed anything (c18ffde + the fixtures), so a refactor that changes a
mode's numbers fails ``tests/multirank/test_golden.py`` bitwise on this machine. Each case is a
job's ``dice-ds sample`` flags with a mode's settings over them (the rows of ``dice_ds/modes.py``,
plus DDPM/DDIM variants of
the loop and the shipped digits model in sync EP, DICE and displaced SP), sampled through
``DiTMoEPipeline`` with the same labels, seed and step count; rank 0 returns every case's latents.

The fixtures are data: if the way a pipeline is built from flags changes, only ``_pipeline``
below changes, never the .npz files (regenerating them would make the test unable to fail).
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = {2: os.path.join(HERE, "golden", "latents_n2.npz"),
            4: os.path.join(HERE, "golden", "latents_n4.npz")}
DEBUG = ("--model", "debug", "--init", "random", "--init-seed", "3", "--vae", "none",
         "--num-sampling-steps", "6", "--cfg-scale", "1.5")
DIGITS = ("--model", "digits", "--ckpt", os.path.join(ROOT, "dice_ds", "assets", "digits_dit_moe.pt"),
          "--vae", "identity", "--num-sampling-steps", "6", "--cfg-scale", "1.5")
LABELS = {"debug": [3, 1, 4, 1, 5, 9, 2, 6], "digits": [0, 1, 2, 3, 4, 5, 6, 7]}
SEED = 11


def cases(world: int) -> dict[str, tuple[tuple[str, ...], dict]]:
    """Case name -> (the job's flags, the mode's settings of ``dice_ds.modes``), for ``world``
    ranks."""
    from dice_ds.modes import MESH_MODES, MODES

    out = {}
    for mode in MODES:
        if (mode.key in MESH_MODES) != (world >= 4) or mode.same_as:
            continue
        out[f"debug/{mode.key}"] = (DEBUG, mode.settings)
    if world == 2:
        by = {m.key: m.settings for m in MODES}
        for sampler in ("ddpm", "ddim"):
            for key in ("sync", "displaced", "dice", "sp-async"):
                out[f"debug-{sampler}/{key}"] = (DEBUG + ("--sampler", sampler), by[key])
        for key in ("sync", "dice", "sp-async"):
            out[f"digits/{key}"] = (DIGITS, by[key])
    return out


OVERLAPPED = {2: ("debug/sync", "debug/displaced", "debug/interweaved", "debug/iw-low",
                  "debug-ddim/dice", "digits/sync", "digits/dice"),
              4: ("debug/ep-sp", "debug/hybrid")}
"""Fixture cases re-run with overlapped sync calls (``--ep-overlap``): same outputs up to float
rounding, as for the modes whose ``Mode.same_as`` names a fixture mode."""


def same_as_cases(world: int) -> dict[str, tuple[tuple, str]]:
    """Cases that only reschedule work: name -> (case, the fixture case they must equal up to
    float rounding): the ``dice_ds.modes`` rows with ``same_as`` and ``OVERLAPPED``."""
    from dice_ds.modes import MESH_MODES, MODES

    fixtures = cases(world)
    out = {}
    for mode in MODES:
        if mode.same_as and (mode.same_as in MESH_MODES) == (world >= 4):
            out[f"debug/{mode.key}"] = ((DEBUG, mode.settings), f"debug/{mode.same_as}")
    for name in OVERLAPPED.get(world, ()):
        flags, settings = fixtures[name]
        out[f"{name}+overlap"] = ((flags, {**settings, "ep_overlap": True}), name)
    return out


def _pipeline(case):
    from dice_ds import DiTMoEPipeline
    from dice_ds.options import from_overrides, parse_options

    flags, settings = case
    return DiTMoEPipeline(from_overrides(settings, base=parse_options(list(flags))),
                          output_ranks="rank0")


def interrupted_then_again(pipe, hook, error: type[Exception], rank: int) -> dict:
    """Call ``pipe`` on the debug labels with ``hook`` installed on block 1 (a handle-returning
    ``register_forward_*hook`` of that block), catching ``error``; then call it again without it.
    Returns the caught line ("raised"), what the runtime still holds afterwards ("after":
    in-flight handles, held bytes), the step the pipeline reports it was in ("position") and the
    second call's latents on rank 0 ("latents")."""
    handle = hook(pipe.model.blocks[1])
    try:
        pipe(class_labels=LABELS["debug"], seed=SEED, output_type="latent")
        raised = None
    except error as e:
        raised = str(e)
    handle.remove()
    after = (pipe.runtime.inflight_handles(), pipe.runtime.held_bytes())
    position = pipe.position.describe()
    got = pipe(class_labels=LABELS["debug"], seed=SEED, output_type="latent")
    pipe.runtime.detach()
    return {"raised": raised, "after": after, "position": position,
            "latents": got.images.numpy() if rank == 0 else None}


def run_cases(rank: int, world: int, which: str = "fixtures") -> dict[str, np.ndarray] | None:
    """Every case on this rank (collective; ``which``: the fixture ``cases`` or the
    ``same_as_cases``); rank 0 returns name -> latents."""
    out = {}
    todo = (cases(world) if which == "fixtures"
            else {name: case for name, (case, _ref) in same_as_cases(world).items()})
    for name, case in todo.items():
        labels = LABELS[name.split("/")[0].split("-")[0]]
        pipe = _pipeline(case)
        got = pipe(class_labels=labels, seed=SEED, output_type="latent")
        if rank == 0:
            out[name] = got.images.numpy()
        pipe.runtime.detach() if hasattr(pipe.runtime, "detach") else None
        del pipe
    return out if rank == 0 else None


def main() -> None:  # pragma: no cover - run once by hand to write the fixtures
    import tempfile

    sys.path.insert(0, HERE)
    from distributed import run_ranks

    for world, path in FIXTURES.items():
        with tempfile.TemporaryDirectory() as tmp:
            got = run_ranks(run_cases, world, tmp, timeout=900)[0]
        np.savez_compressed(path, **got)
        print(f"{path}: {len(got)} cases: {', '.join(got)}")


if __name__ == "__main__":
    main()
