"""diffusers' words on ``DiTMoEPipeline`` on one process (dice_ds/pipeline/diffusers_api.py,
dice_ds/diffusion/schedulers.py, dice_ds/labels.py): schedulers (defaults bitwise, swaps,
refusals, state per call), class names, ``torch_dtype``, ``to()``, the progress bar and the step
callback. Every parallel mode under every scheduler, and diffusers' own example at 1 and 2 ranks
and under torchrun: tests/multirank/test_diffusers_example.py."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from dice_ds.config import ConfigError

DEBUG_DDPM = dict(init="random", init_seed=3, sampler="ddpm", vae="none")


@pytest.fixture(scope="module")
def digits():
    from dice_ds import DiTMoEPipeline

    return DiTMoEPipeline.from_pretrained("digits")


@pytest.fixture(scope="module")
def ddpm():
    from dice_ds import DiTMoEPipeline

    return DiTMoEPipeline.from_pretrained("debug", **DEBUG_DDPM)


def _latents(pipe, steps, labels=(1, 7, 3), guidance=1.5, **kw):
    return pipe(class_labels=list(labels), num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.manual_seed(33), output_type="latent", **kw).images


def _swap(pipe, scheduler):
    saved = pipe._scheduler
    pipe.scheduler = scheduler
    return saved


def test_a_call_that_never_reads_the_scheduler_does_not_import_diffusers():
    code = ("import sys\nfrom dice_ds import DiTMoEPipeline\n"
            "pipe = DiTMoEPipeline.from_pretrained('digits')\n"
            "pipe(class_labels=[1], num_inference_steps=2, output_type='latent')\n"
            "assert 'diffusers' not in sys.modules\n"
            "pipe.scheduler\nassert 'diffusers' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_default_schedulers_are_todays_samplers_bitwise_and_configure_diffusers_ones(digits, ddpm):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    from dice_ds.diffusion.schedulers import DiTMoEDDPMScheduler, DiTMoEFlowScheduler

    for pipe, kind in ((digits, DiTMoEFlowScheduler), (ddpm, DiTMoEDDPMScheduler)):
        pipe._scheduler = None
        untouched = _latents(pipe, 5)
        assert type(pipe.scheduler) is kind
        saved = _swap(pipe, type(pipe.scheduler).from_config(pipe.scheduler.config))
        assert torch.equal(_latents(pipe, 5), untouched)  # the adapter runs the same rule
        pipe._scheduler = saved
    flow = DPMSolverMultistepScheduler.from_config(digits.scheduler.config).config
    assert flow.use_flow_sigmas and flow.prediction_type == "flow_prediction"
    eps = DDPMScheduler.from_config(ddpm.scheduler.config).config
    assert (eps.variance_type, eps.clip_sample, eps.beta_schedule, eps.prediction_type,
            eps.beta_start, eps.beta_end, eps.num_train_timesteps) == (
        "learned_range", False, "linear", "epsilon", 1e-4, 0.02, 1000)
    # the hand-written DDIM stands behind the same interface; the adapter's step() works alone
    ddim = DDIMScheduler.from_config(ddpm.scheduler.config)
    assert ddim.config.timestep_spacing == "linspace"
    s = type(digits.scheduler).from_config(digits.scheduler.config)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [1.0, 0.75, 0.5, 0.25]
    x = torch.ones(1, 1, 2, 2)
    assert torch.equal(s.step(torch.ones(1, 1, 2, 2), s.timesteps[0], x).prev_sample, x - 0.25)


def test_diffusers_ddpm_equals_the_hand_written_ddpm_within_float_rounding(ddpm):
    from diffusers import DDPMScheduler

    ddpm._scheduler = None
    ours = _latents(ddpm, 12, guidance=4.0)
    saved = _swap(ddpm, DDPMScheduler.from_config(ddpm.scheduler.config))
    theirs = _latents(ddpm, 12, guidance=4.0)  # learned-range variance, the samples' own noise
    ddpm._scheduler = saved
    scale = float(ours.abs().max())
    assert float((theirs - ours).abs().max()) <= 1e-5 * scale, (theirs - ours).abs().max()


def test_flow_schedulers_follow_the_models_time_and_velocity_convention(digits):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    digits._scheduler = None
    reference = _latents(digits, 100)  # Euler, 100 steps: close to the flow's solution
    errors = {}
    for cls, steps in ((FlowMatchEulerDiscreteScheduler, 50), (DPMSolverMultistepScheduler, 10)):
        saved = _swap(digits, cls.from_config(digits.scheduler.config))
        errors[cls.__name__] = float((_latents(digits, steps) - reference).abs().mean())
        digits._scheduler = saved
    # a wrong sign or time scale lands far away (mean |x| of a digit image is about 0.8)
    assert max(errors.values()) < 0.05, errors


def test_schedulers_that_do_not_fit_the_training_objective_are_refused_in_one_line(digits, ddpm):
    from diffusers import (
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    cases = [
        (digits, DDPMScheduler(), "DDPMScheduler: a noise-prediction (DDPM-family) scheduler does "
                                  "not fit digits's rectified-flow training"),
        (digits, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "mu"),
        (ddpm, FlowMatchEulerDiscreteScheduler(), "a flow-matching scheduler does not fit debug's "
                                                  "DDPM training"),
        (ddpm, DPMSolverMultistepScheduler.from_config(ddpm.scheduler.config,
                                                       beta_schedule="scaled_linear"),
         "beta_schedule='scaled_linear' do not match debug's training"),
        (ddpm, DPMSolverMultistepScheduler.from_config(ddpm.scheduler.config,
                                                       prediction_type="v_prediction"),
         "prediction_type='v_prediction'"),
        (ddpm, object(), "object: not a diffusers scheduler"),
    ]
    for pipe, scheduler, needle in cases:
        before = pipe._scheduler
        with pytest.raises(ConfigError) as e:
            pipe.scheduler = scheduler
        line = str(e.value)
        assert needle in line and "\n" not in line and "from_config(pipe.scheduler.config)" in line
        assert pipe._scheduler is before


def test_multistep_state_is_fresh_per_call_and_the_users_object_is_never_stepped(ddpm):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    for cls in (DPMSolverMultistepScheduler, EulerDiscreteScheduler):  # Euler: scaled input
        mine = cls.from_config(ddpm.scheduler.config)
        saved = _swap(ddpm, mine)
        first, second = _latents(ddpm, 6), _latents(ddpm, 6)
        ddpm._scheduler = saved
        assert torch.equal(first, second) and bool(torch.isfinite(first).all())
        assert mine.num_inference_steps is None  # the pipeline stepped copies only


def test_class_names_as_in_diffusers(digits, ddpm):
    assert ddpm.get_label_ids(["white shark", "umbrella"]) == [2, 879]
    assert ddpm.id2label[2].startswith("great white shark, white shark")
    assert len(ddpm.id2label) == 1000 and list(ddpm.labels) == sorted(ddpm.labels)
    assert digits.get_label_ids(["seven", "2"]) == [7, 2] and digits.id2label[7] == "seven, 7"
    assert digits.get_label_ids("nine") == [9]
    with pytest.raises(ConfigError, match=r"'white shark' is not a class name of this model"):
        digits.get_label_ids(["white shark"])


def test_torch_dtype_is_an_alias_of_dtype_and_to_moves_a_one_process_pipeline():
    from dice_ds import DiTMoEPipeline
    from dice_ds.pipeline.prepare import pipeline_options

    assert pipeline_options("digits", torch_dtype=torch.bfloat16).dtype == "bf16"
    assert pipeline_options("digits", torch_dtype="float16").dtype == "fp16"
    with pytest.raises(ConfigError, match="torch_dtype=torch.int8: use fp32, bf16 or fp16"):
        pipeline_options("digits", torch_dtype=torch.int8)
    with pytest.raises(ConfigError, match="contradicts"):
        pipeline_options("digits", dtype="bf16", torch_dtype=torch.float16)
    pipe = DiTMoEPipeline.from_pretrained("digits", torch_dtype=torch.float32)
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    model = pipe.model
    assert pipe.to("cpu") is pipe and pipe.model is model  # where it is: nothing happens
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    assert pipe(class_labels=[3], num_inference_steps=2, output_type="latent").images.shape == (
        1, 1, 16, 16)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pipe.to("cuda")
    with pytest.raises(ConfigError, match="pipe.to.'tpu'.: use 'cpu' or 'cuda'"):
        pipe.to("tpu")


def test_progress_bar_and_step_callback(digits):
    digits._scheduler = None
    digits.set_progress_bar_config(disable=True)
    assert digits.progress_bar(range(3)).disable
    seen = []

    def record(pipe, step, timestep, kwargs):
        seen.append((step, timestep, kwargs["latents"].clone()))
        return kwargs

    full = _latents(digits, 5, callback_on_step_end=record)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4] and [t for _, t, _ in seen] == [
        1.0, 0.8, 0.6, 0.4, 0.2]
    assert torch.equal(seen[-1][2], full)

    def stop_after_two(pipe, step, timestep, kwargs):
        pipe._interrupt = step == 1
        return {}

    early = _latents(digits, 5, callback_on_step_end=stop_after_two)
    assert torch.equal(early, seen[1][2]) and digits.interrupt  # until the next call

    def zero(pipe, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    assert not _latents(digits, 3, callback_on_step_end=zero).any() and not digits.interrupt
    with pytest.raises(ConfigError, match="'prompt_embeds' is not a tensor of this pipeline"):
        _latents(digits, 2, callback_on_step_end=record,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with pytest.raises(ConfigError, match="returned latents of shape"):
        _latents(digits, 2, callback_on_step_end=lambda p, s, t, k: {"latents": np.zeros(3)})
