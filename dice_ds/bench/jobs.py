"""The sampling job of a ``dice-ds bench`` invocation and each run's settings file.

Owns ``job_of`` (the bench's job flags, with the extra ``dice-ds sample`` flags after ``--`` parsed
once over them), ``run_settings`` (a mode's settings over the job, or the job over a
``--mode-config`` file's) and ``run_config`` (a run's ``settings.json`` and its ``dice-ds sample``
arguments), shared by the flat bench (``dice_ds.bench.cli``) and the node bench
(``dice_ds.bench.node_bench``).
"""

from __future__ import annotations

from pathlib import Path

from dice_ds.bench.launch import SAMPLES
from dice_ds.ds_config import Settings, load_tree, write_config
from dice_ds.modes import by_key
from dice_ds.options import from_overrides, from_tree, given, parse_options


def job_of(a) -> Settings:
    """The sampling job every mode runs (only the mode's settings differ): the bench's own job
    settings, with the extra ``dice-ds sample`` flags after ``--`` parsed once, as the sampler
    parses them, over them. The plan's workload is derived from this tree (``meta.settings``)."""
    job = {"model": a.model, "image_size": a.image_size, "device": "cpu", "vae": "none",
           "sampler": "rf", "num_sampling_steps": a.steps, "per_proc_batch_size": a.batch,
           "num_fid_samples": a.ranks * a.batch, "cfg_scale": 1.5, "global_seed": 0,
           **({"ckpt": a.ckpt} if a.ckpt else {"init": "random"})}
    return from_overrides(given(parse_options(list(a.extra))), base=from_overrides(job))


WEIGHTS = ("ckpt", "init")
"""The settings naming where the weights come from: the job's pair replaces a mode file's."""


def run_settings(a, job: Settings, m: str) -> Settings:
    """What mode ``m``'s runs sample: the mode's settings over the job, or the job over a
    ``--mode-config`` file's settings (the job's weights source replacing the file's: a file made
    for random weights runs a ``--ckpt`` job too)."""
    if m in getattr(a, "custom", {}):
        over = {**given(job), **{k: getattr(job, k) for k in WEIGHTS}}
        return from_overrides(over, base=from_tree(load_tree(a.custom[m]), a.custom[m]))
    return from_overrides(by_key(m).settings, base=job)


def run_config(s: Settings, run_dir: Path) -> list[str]:
    """Write ``s``, its samples going to ``run_dir/samples``, to ``run_dir/settings.json``; the
    run's ``dice-ds sample`` arguments (``--config`` that file)."""
    s = from_overrides({"sample_dir": str(run_dir / SAMPLES)}, base=s)
    return write_config(s, run_dir / "settings.json")
