"""diffusers' own ``DiTPipeline`` example on ``DiTMoEPipeline``, and every parallel mode under every
scheduler (issue 24).

1. The docstring example of ``diffusers.DiTPipeline.__call__`` (read from the installed diffusers,
   0.42.1) with its import line and its checkpoint line replaced (``DiTMoEPipeline`` imported as
   ``DiTPipeline``; the shipped digits model in DICE mode, or a random DiT-S/2 checkpoint with a
   tiny random SD VAE), ``"cuda"`` read as ``"cpu"`` on this CPU machine, and for the digits model
   digit words instead of ImageNet's: DPM-Solver++ at 25 steps, at 1 and 2 ranks (in-process gloo
   ranks), then on 2 ranks under a real ``torchrun`` (the issue's "done when"), whose image equals
   the in-process one.
2. Every scheduler the issue names (DDPM flavor: DPM-Solver++, DDIM, Euler, DDPM; rectified flow:
   flow-match Euler, DPM-Solver++ with flow sigmas; and Heun, whose 3 steps are 5 forwards, so
   the runtime's schedule must count the scheduler's timesteps) in every parallel mode (sync EP, displaced,
   interweaved, DICE, displaced SP) on the random debug model, 3 steps: finite, sync EP equal to
   DP, the runtime driven over the scheduler's step count; and a step callback that stops the
   call on rank 0 stops it on both ranks.
"""
import inspect
import json
import os
import subprocess
import sys

import numpy as np
from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DICE = os.path.join(ROOT, "configs", "ds", "digits_dice.json")
DIGITS_LINE = ('pipe = DiTPipeline.from_pretrained("digits", config="configs/ds/digits_dice.json", '
               'torch_dtype=torch.float32, output_ranks="all")')
"""The checkpoint line of the README's example (the config relative to the repository root)."""


def diffusers_example(checkpoint_line: str, digits: bool) -> str:
    """The ``>>>`` lines of ``DiTPipeline.__call__``'s docstring, with the import and the
    checkpoint line replaced (module docstring)."""
    from diffusers import DiTPipeline

    doc = inspect.getdoc(DiTPipeline.__call__)
    block = doc.split("```py", 1)[1].split("```", 1)[0]
    lines = [ln[4:] for ln in block.splitlines() if ln.startswith(">>> ")]
    swaps = {
        "from diffusers import DiTPipeline, DPMSolverMultistepScheduler":
            "from diffusers import DPMSolverMultistepScheduler; "
            "from dice_ds import DiTMoEPipeline as DiTPipeline",
        'pipe = DiTPipeline.from_pretrained("facebook/DiT-XL-2-256", torch_dtype=torch.float16)':
            checkpoint_line,
        'pipe = pipe.to("cuda")': 'pipe = pipe.to("cpu")',  # no GPU here: where it already is
    }
    if digits:
        swaps['words = ["white shark", "umbrella"]'] = 'words = ["seven", "two"]'
    for old, new in swaps.items():
        assert lines.count(old) == 1, old  # the example as diffusers 0.42.1 writes it
        lines[lines.index(old)] = new
    assert "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)" in lines
    assert "output = pipe(class_labels=class_ids, num_inference_steps=25, generator=generator)" \
        in lines
    return "\n".join(lines) + "\n"


def s2_fixtures(folder: str) -> tuple[str, str]:
    """A random DiT-S/2 checkpoint (2 blocks, 64x64 images) and a tiny random SD-layout VAE."""
    from diffusers.models import AutoencoderKL

    from dice_ds.config import get_flavor
    from dice_ds.weights.write import write_random_checkpoint

    ckpt, vae = os.path.join(folder, "s2.pt"), os.path.join(folder, "vae")
    write_random_checkpoint(get_flavor("DiT-S/2").replace(depth=2, input_size=8), ckpt,
                            progress=False)
    AutoencoderKL(block_out_channels=[32] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1,
                  norm_num_groups=8).save_pretrained(vae)
    return ckpt, vae


def s2_line(ckpt: str, vae: str, world: int) -> str:
    mode = (", ep=True, ep_async=True, ep_async_pipeline=True, ep_async_mode='shallow', "
            "ep_async_noskip_step=2, ep_async_skip_strategy='low'") if world > 1 else ""
    return (f"pipe = DiTPipeline.from_pretrained({ckpt!r}, torch_dtype=torch.float32, "
            f"model='DiT-S/2', depth=2, image_size=64, vae='sd', vae_path={vae!r}, "
            f"output_ranks='all'{mode})")


def _run_example(code: str) -> dict:
    scope = {"__name__": "__main__"}
    exec(compile(code, "DiTPipeline example", "exec"), scope)
    out = scope["output"]
    return {"image": None if out.images is None else np.asarray(out.images[0]),
            "class_ids": scope["class_ids"], "stats": {k: out.stats[k] for k in (
                "mode", "sampler", "num_inference_steps", "world_size")}}


def _examples(rank, world, ckpt, vae):
    line = DIGITS_LINE.replace('config="configs/ds/digits_dice.json", ',
                               f"config={DICE!r}, " if world > 1 else "")
    return {"digits": _run_example(diffusers_example(line, True)),
            "s2": _run_example(diffusers_example(s2_line(ckpt, vae, world), False))}


def test_diffusers_ditpipeline_example_at_one_and_two_ranks_and_under_torchrun(tmp_path):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"```python\n{diffusers_example(DIGITS_LINE, True)}```" in readme  # the README shows it
    ckpt, vae = s2_fixtures(str(tmp_path))
    r0, r1 = run_ranks(_examples, 2, tmp_path, ckpt, vae, timeout=400)
    (one,) = run_ranks(_examples, 1, tmp_path, ckpt, vae, timeout=400)
    for name, ids, side, mode in (("digits", [7, 2], 16, "interweaved"), ("s2", [2, 879], 64,
                                                                         "interweaved")):
        got = r0[name]
        assert got["class_ids"] == ids and got["image"].shape == (side, side, 3)
        assert got["stats"] == {"mode": mode, "sampler": "DPMSolverMultistepScheduler",
                                "num_inference_steps": 25, "world_size": 2}
        assert np.array_equal(r1[name]["image"], got["image"])  # output_ranks="all"
        assert one[name]["stats"]["world_size"] == 1 and one[name]["image"].shape == (
            side, side, 3)
    # the "done when": the example under torchrun, 2 ranks, DICE; rank 0 saves what it got
    script = tmp_path / "example.py"
    script.write_text(diffusers_example(DIGITS_LINE, True) + (
        "import json, numpy, torch.distributed as dist\n"
        "if dist.get_rank() == 0:\n"
        f"    numpy.save({str(tmp_path / 'tr.npy')!r}, numpy.asarray(image))\n"
        f"    json.dump(output.stats['mode'], open({str(tmp_path / 'tr.json')!r}, 'w'))\n"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(tmp_path / "tr.json")) == "interweaved"
    assert np.array_equal(np.load(tmp_path / "tr.npy"), r0["digits"]["image"])


RF_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler")
DDPM_SCHEDULERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                   "DDPMScheduler", "HeunDiscreteScheduler")
FORWARDS = {"HeunDiscreteScheduler": 2 * 3 - 1}
"""Model forwards of a 3-step call where it is not 3 (Heun: two per interval but the last)."""
MODES = ("dp", "sync", "displaced", "interweaved", "dice", "sp-async")
STEPS = 3


def _every_mode(rank, world):
    import diffusers
    import torch

    from dice_ds import DiTMoEPipeline
    from dice_ds.modes import MODES as ROWS

    settings = {m.key: m.settings for m in ROWS}
    out = {}
    for sampler, names in (("rf", RF_SCHEDULERS), ("ddpm", DDPM_SCHEDULERS)):
        for mode in MODES:
            pipe = DiTMoEPipeline.from_pretrained("debug", init="random", init_seed=3,
                                                  vae="none", sampler=sampler,
                                                  **settings[mode])
            for name in names:
                pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
                got = pipe(class_labels=[3, 1, 4, 1], num_inference_steps=STEPS,
                           generator=torch.manual_seed(5), output_type="latent")
                rt = got.stats["runtime"] or {}
                out[sampler, name, mode] = (got.images, sorted(rt.get("sync_steps") or {}))
            if mode == "dice" and sampler == "rf":
                out["stop"] = _stopped_call(pipe, rank)
            pipe.runtime.detach()
    return out


def _stopped_call(pipe, rank):
    """A callback on rank 0 stops the call after step 2 of 3 on both ranks; the next call is a
    clean one (equal to the same call again)."""
    import torch

    calls = []

    def stop(p, step, timestep, kwargs):
        calls.append(step)
        p._interrupt = step == 1
        return kwargs

    kw = dict(class_labels=[3, 1], num_inference_steps=STEPS, generator=None, seed=1,
              output_type="latent")
    stopped = pipe(callback_on_step_end=stop, **kw).images
    again, again2 = pipe(**kw).images, pipe(**kw).images
    same = None if again is None else bool(torch.equal(again, again2))
    differs = None if again is None else not bool(torch.equal(stopped, again))
    return calls, same, differs


def test_every_scheduler_runs_every_parallel_mode(tmp_path):
    r0, r1 = run_ranks(_every_mode, 2, tmp_path, timeout=600)
    for sampler, names in (("rf", RF_SCHEDULERS), ("ddpm", DDPM_SCHEDULERS)):
        for name in names:
            dp = r0[sampler, name, "dp"][0]
            for mode in MODES:
                images, steps = r0[sampler, name, mode]
                assert images.shape == (4, 4, 8, 8) and bool(images.isfinite().all()), (name, mode)
                if mode in ("displaced", "interweaved", "dice"):  # the first step, S, is sync
                    assert max(steps) == FORWARDS.get(name, STEPS), (sampler, name, mode, steps)
                if mode == "sync":
                    assert np.allclose(images.numpy(), dp.numpy(), rtol=1e-5, atol=1e-5), name
                if mode in ("displaced", "interweaved", "dice", "sp-async"):
                    assert not np.array_equal(images.numpy(), dp.numpy()), (name, mode)  # stale
    calls, same, differs = r0["stop"]
    assert calls == [0, 1] and same and differs
    assert r1["stop"] == ([], None, None)  # rank 1 ran no callback and stopped with rank 0
