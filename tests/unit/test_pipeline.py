"""``DiTMoEPipeline`` on one process: lazy export, settings merge, one-line errors before any process
group, the randomness rules (seed = the CLI's draws; generators; latents), output types, repeated
calls. Multi-rank behaviour and the README example: tests/multirank/test_pipeline_cli.py."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dice_ds.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DICE = os.path.join(ROOT, "configs", "ds", "digits_dice.json")


def test_import_dice_ds_is_cheap_and_the_pipeline_is_imported_on_first_access():
    code = ("import sys, dice_ds\n"
            "assert 'torch' not in sys.modules and 'dice_ds.pipeline' not in sys.modules\n"
            "assert 'DiTMoEPipeline' in dir(dice_ds)\n"
            "from dice_ds import DiTMoEPipeline, DiTMoEPipelineOutput\n"
            "assert DiTMoEPipeline.__module__ == 'dice_ds.pipeline.core'\n"
            "import torch.distributed as dist\n"
            "assert not dist.is_initialized()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_from_pretrained_merges_defaults_config_weights_and_overrides():
    from dice_ds.pipeline.prepare import SHIPPED, pipeline_options

    opts = pipeline_options("digits", config=DICE)
    assert opts.ckpt == SHIPPED["digits"]["ckpt"] and os.path.isabs(opts.ckpt)
    assert opts.model == "digits" and opts.vae == "identity" and opts.init is None
    assert opts.ep and opts.ep_async and opts.ep_async_pipeline and opts.ep_async_noskip_step == 2
    assert opts.per_proc_batch_size == 32 and opts.num_fid_samples == 50000  # job options dropped
    opts = pipeline_options("digits", config=DICE, dtype=torch.bfloat16, device="cpu",
                            cfg_scale=2.0, vae="none")
    assert (opts.dtype, opts.device, opts.cfg_scale, opts.vae) == ("bf16", "cpu", 2.0, "none")
    opts = pipeline_options("debug", config={"dice": {"model": {"name": "digits", "ckpt": "x.pt"}}},
                            init="random")
    assert opts.model == "debug" and opts.ckpt is None and opts.init == "random"
    assert pipeline_options(config=DICE).ckpt == SHIPPED["digits"]["ckpt"]  # shipped:digits


@pytest.mark.parametrize("args, kwargs, needle", [
    (("DiT-Q/2",), {}, "not a checkpoint file, a shipped model"),
    (("debug",), {}, "no weights: pass ckpt PATH, or init random|dit"),
    (("digits",), {"cfg_scale": 0.5}, "cfg_scale 0.5 must be >= 1"),
    (("digits",), {"ep_async": True}, "(ep_async) needs expert parallelism: pass ep"),
    (("digits",), {"sample_dir": "out"}, "sample_dir: an option of the dice-ds sample job"),
    (("digits",), {"frobnicate": 1}, "unknown option 'frobnicate'"),
    (("digits",), {"ep": "yes"}, "ep='yes': must be True or False"),
    (("digits",), {"dtype": "int8"}, "dtype='int8': use fp32, bf16 or fp16"),
    (("digits",), {"config": {"dice": {"sampling": {"cfg_scale": "2"}}}}, "(cfg_scale)"),
    (("digits",), {"config": DICE}, "needs expert parallelism"),  # interweaved EP on one rank
    (("digits",), {"output_ranks": "rank1"}, "output_ranks='rank1': use one of"),
    # the API edges of issue 21 (tests/unit/test_nonfinite.py has the call's)
    ((123,), {}, "from_pretrained(123): pass a checkpoint path, a shipped model (digits) or a "
                 "model flavor name (a str; got int)"),
    ((None,), {"init": "random"}, "from_pretrained(None) names no model: pass a checkpoint"),
    (("debug",), {"init": "bogus"}, "init 'bogus': Input should be 'random' or 'dit'"),
    (("debug",), {"init": "random", "sampler": "bogus"},
     "sampler 'bogus': Input should be 'rf', 'ddpm' or 'ddim'"),
    (("debug",), {"init": "random", "cfg_scale": 1e300}, "cfg_scale 1e+300 must be <= 10000"),
    (("debug",), {"init": "random", "vae": "none", "num_sampling_steps": 10**12},
     "num_sampling_steps 1000000000000 must be in [1, 10000] for rf"),
    (("DiT-XL/2",), {"init": "random", "vae": "none", "depth": 10**8}, "per rank (weights alone"),
])
def test_bad_settings_are_one_line_before_any_process_group(monkeypatch, args, kwargs, needle):
    import dice_ds.pipeline.core as core
    from dice_ds import DiTMoEPipeline

    def no_groups(spec):
        raise AssertionError("a process group was started before the settings were checked")

    monkeypatch.setattr(core, "connect", no_groups)
    with pytest.raises(ConfigError) as e:
        DiTMoEPipeline.from_pretrained(*args, world_size=1, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def digits():
    from dice_ds import DiTMoEPipeline

    return DiTMoEPipeline.from_pretrained("digits", world_size=1)


def test_seed_draws_the_cli_samples_and_generators_latents_follow_the_documented_rules(digits):
    from dice_ds.diffusion import draw_conditions, sample_generators, step_rule
    from dice_ds.pipeline.denoise import denoise
    from dice_ds.schedule import Schedule

    kw = dict(num_inference_steps=3, output_type="latent")
    out = digits(batch_size=4, seed=7, first_index=5, **kw)
    z, y, gens = draw_conditions(7, [5, 6, 7, 8], 1, 16, 10)
    sched = Schedule.build(digits.spec.plan, 3, digits.spec.model_cfg.depth)
    ref = denoise(step_rule("rf", 3), digits.model, z, y, 1.5, runtime=digits.runtime,
                  schedule=sched, generators=gens)
    assert torch.equal(out.images, ref) and out.indices == [0, 1, 2, 3]
    same = digits(generator=sample_generators(7, [5, 6, 7, 8]), **kw)  # a list: label, noise
    assert torch.equal(same.images, ref)
    labels = digits(class_labels=y.tolist(), latents=z, seed=0, **kw)  # given: replace the draws
    assert torch.equal(labels.images, ref)
    one = torch.Generator().manual_seed(1)
    a = digits(class_labels=[3, 4], generator=one, **kw)
    b = digits(class_labels=[3, 4], generator=one, **kw)  # the generator moved on
    c = digits(class_labels=[3, 4], generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a.images, c.images) and not torch.equal(a.images, b.images)


def test_output_types_stats_and_repeated_calls(digits):
    from dice_ds.vae import to_uint8_nhwc

    kw = dict(class_labels=[0, 7, 9], num_inference_steps=3, seed=2)
    lat = digits(output_type="latent", **kw)
    pil = digits(**kw)
    assert len(pil.images) == 3 and pil.images[0].mode == "RGB" and pil.images[0].size == (16, 16)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil.images]), to_uint8_nhwc(lat.images))
    arr = digits(output_type="np", **kw).images
    pt = digits(output_type="pt", **kw).images
    assert arr.shape == (3, 16, 16, 1) and 0 <= arr.min() and arr.max() <= 1
    assert torch.equal(pt, ((lat.images / 2 + 0.5).clamp(0, 1)))
    assert np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    (images,) = digits(return_dict=False, output_type="latent", **kw)
    assert torch.equal(images, lat.images)
    other = digits(class_labels=[1], num_inference_steps=5, output_type="latent", seed=2)
    assert other.images.shape == (1, 1, 16, 16) and other.stats["num_inference_steps"] == 5
    assert torch.equal(digits(output_type="latent", **kw).images, lat.images)
    s = lat.stats
    assert s["mode"] == "dp" and s["world_size"] == 1 and s["sampler"] == "rf"
    assert s["num_images"] == 3 and s["guidance_scale"] == 1.5 and s["seconds"] > 0
    assert s["bytes_exchanged"] == 0 and isinstance(s["runtime"], dict)


@pytest.mark.parametrize("kwargs, needle", [
    ({"class_labels": [10]}, "class_labels: 10 is not a class of this model (0..9)"),
    ({"class_labels": []}, "non-empty list of integer class ids"),
    ({}, "class_labels=None needs batch_size=N"),
    ({"class_labels": [1, 2], "batch_size": 3}, "the batch size differs"),
    ({"class_labels": [1], "num_inference_steps": 0}, "num_inference_steps=0 must be in [1,"),
    ({"class_labels": [1], "guidance_scale": 0.5}, "guidance_scale=0.5 must be >= 1"),
    ({"class_labels": [1], "seed": -1}, "seed=-1 must be in [0,"),
    ({"class_labels": [1], "latents": torch.zeros(1, 4, 16, 16)}, "expected [B, 1, 16, 16]"),
    ({"class_labels": [1, 2], "generator": [torch.Generator()]},
     "the batch size differs between class_labels (2), generator (1)"),
    ({"class_labels": [1], "output_type": "jpg"}, "output_type='jpg': use one of"),
    ({"class_labels": [1], "output_ranks": "some"}, "output_ranks='some': use one of"),
    ({"class_labels": [1], "local_limit": 1}, "local_limit=1: only with output_ranks='local'"),
])
def test_bad_call_arguments_are_one_line(digits, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        digits(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_local_limit_keeps_and_decodes_a_prefix_of_the_same_samples(digits):
    kw = dict(class_labels=[1, 2, 3], num_inference_steps=2, seed=3, output_ranks="local")
    full = digits(output_type="latent", **kw)
    two = digits(output_type="latent", local_limit=2, **kw)
    assert torch.equal(two.images, full.images[:2]) and two.indices == [0, 1]
    pil = digits(output_type="pil", local_limit=1, **kw)
    assert len(pil.images) == 1 and pil.indices == [0]
    assert digits(output_type="pil", local_limit=0, **kw).images == []


def test_a_latents_only_pipeline_refuses_image_outputs():
    from dice_ds import DiTMoEPipeline

    pipe = DiTMoEPipeline.from_pretrained("debug", init="random", vae="none", world_size=1)
    assert pipe(class_labels=[1, 2], num_inference_steps=2,
                output_type="latent").images.shape == (2, 4, 8, 8)
    with pytest.raises(ConfigError, match="needs a decoder, and this pipeline has vae='none'"):
        pipe(class_labels=[1])
