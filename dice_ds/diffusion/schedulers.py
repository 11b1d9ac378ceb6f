"""diffusers schedulers as the pipeline's samplers (``DiTMoEPipeline.scheduler``).

Imports diffusers (seconds to load): only ``dice_ds.pipeline.diffusers_api`` imports this module, and
only when a scheduler object is read or set, so ``import dice_ds`` and ``dice-ds sample`` never
load diffusers.

Owns:

- the default scheduler of each training objective, ``DiTMoEFlowScheduler`` (rectified flow: the
  Euler rule of ``dice_ds.diffusion.rf``) and ``DiTMoEDDPMScheduler`` / ``DiTMoEDDIMScheduler``
  (``dice_ds.diffusion.gaussian``): diffusers ``SchedulerMixin``/``ConfigMixin`` objects around
  the hand-written step rules, which the pipeline runs as they are (so the defaults are bitwise
  today's samplers, tested against the original DiT-MoE code). Their ``config`` is the model's
  training process in diffusers' words, so that ``AnyScheduler.from_config(pipe.scheduler.config)``
  is configured for it: DDPM flavors ``num_train_timesteps=1000, beta_start=1e-4,
  beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
  variance_type="learned_range", clip_sample=False, timestep_spacing="linspace"``; rectified flow
  ``num_train_timesteps=1000`` (``FlowMatchEulerDiscreteScheduler``, whose default shift is 1)
  and ``use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction"`` (what
  ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` take for a flow model).
  diffusers warns about the keys another class does not take, as it does for any cross-class
  ``from_config``;
- ``check_fits``: a scheduler that does not fit the flavor's objective is refused in one line
  (noise-prediction schedulers on rectified flow, flow schedulers on DDPM flavors, another beta
  schedule or prediction type);
- ``SchedulerRule``: any other diffusers scheduler as a ``dice_ds.diffusion.StepRule``, run by the
  pipeline's loop (dice_ds/pipeline/denoise.py).

Conventions of ``SchedulerRule``:

- steps: i = S..1 over the scheduler's ``timesteps`` (S = their count, which is the number of
  model forwards, also for second-order schedulers that call the model twice per interval), so
  the runtime's ``begin_step(i)`` and the call's ``dice_ds.schedule.Schedule`` of S steps drive
  every parallel mode alike under every scheduler;
- time: DDPM flavors are fed the scheduler's timestep (a training timestep, 0..999); rectified
  flow is fed t = timestep / num_train_timesteps (= sigma for diffusers' flow schedulers; the
  model's t in [0, 1], 1 = noise). diffusers' flow convention ``x_t = (1 − σ)·x0 + σ·ε`` with
  velocity ``ε − x0`` is the model's (``dice_ds.diffusion.rf``);
- model output: DDPM flavors predict ε and a learned-range variance ([N, 2C]): a
  ``DDPMScheduler`` with ``variance_type`` learned/learned_range gets both halves, every other
  scheduler only ε (as diffusers' ``DiTPipeline`` does), and a learned ``variance_type`` in such a
  scheduler's config is dropped from the call's copy (``DPMSolverMultistepScheduler`` would read
  it as DeepFloyd IF's 3-channel layout); rectified flow: the first C channels (the velocity);
- state: the scheduler is copied at ``set_timesteps`` time per call and again per batch
  (``begin``), so multistep history never crosses batches or calls, and the user's object is
  never stepped;
- noise: a scheduler that draws noise (DDPM, ancestral, SDE variants) is handed the samples'
  own generators (``generator=[one per sample]``: diffusers draws one latent-shaped tensor per
  sample from its generator, the draw the hand-written DDPM makes), so a sample's image does not
  depend on its rank; which steps draw is found once per call by a dry run on a 1×C×1×1 state,
  which also checks that a step draws exactly one such tensor (else refused in one line: the
  pipeline could not keep other ranks' generators in step);
- guidance: the pipeline's (``dice_ds.diffusion.predict``): DDPM flavors guide the first 3
  channels (DiT's rule), rectified flow all.
"""

from __future__ import annotations

import copy
import inspect

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from dice_ds.config import ConfigError
from dice_ds.diffusion import step_rule
from dice_ds.diffusion.gaussian import GUIDED_CHANNELS, TRAIN_STEPS

BETA_START, BETA_END = 1e-4, 0.02
LEARNED = ("learned", "learned_range")
FLOW_EXAMPLE = "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)"
EPS_EXAMPLE = "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)"


class DiTMoEScheduler(SchedulerMixin, ConfigMixin):
    """A hand-written step rule behind diffusers' scheduler interface (module docstring).

    ``set_timesteps(S)``, ``timesteps``, ``scale_model_input`` (identity), ``init_noise_sigma``
    (1), ``order`` (1) and ``step(model_output, timestep, sample, generator=None)`` work as in
    diffusers (``step`` takes the model's full output, as the rule does); the pipeline runs
    ``step_rule(S)`` directly."""

    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0
    sampler = ""
    """The ``dice_ds.diffusion.step_rule`` name this class stands for."""

    def step_rule(self, num_steps: int):
        return step_rule(self.sampler, num_steps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        self.num_inference_steps = int(num_inference_steps)
        self._rule = self.step_rule(self.num_inference_steps)
        self.timesteps = torch.tensor([t for _, t in self._rule.timesteps()], device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        times = [float(t) for t in self.timesteps]
        i = self.num_inference_steps - times.index(float(timestep))
        noise = None
        if self._rule.draws_noise(i):
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device,
                                 dtype=torch.float32)
        prev = self._rule.update(i, sample.float(), model_output.float(), noise)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class DiTMoEFlowScheduler(DiTMoEScheduler):
    """Rectified flow, Euler over t = S/S .. 1/S (``dice_ds.diffusion.rf``)."""

    sampler = "rf"

    @register_to_config
    def __init__(self, num_train_timesteps: int = TRAIN_STEPS, use_flow_sigmas: bool = True,
                 flow_shift: float = 1.0,
                 prediction_type: str = "flow_prediction"):
        pass


class DiTMoEDDPMScheduler(DiTMoEScheduler):
    """DiT's ancestral DDPM with learned-range variance (``dice_ds.diffusion.gaussian``)."""

    sampler = "ddpm"

    @register_to_config
    def __init__(self, num_train_timesteps: int = TRAIN_STEPS, beta_start: float = BETA_START,
                 beta_end: float = BETA_END, beta_schedule: str = "linear",
                 prediction_type: str = "epsilon", variance_type: str = "learned_range",
                 clip_sample: bool = False, timestep_spacing: str = "linspace"):
        pass


class DiTMoEDDIMScheduler(DiTMoEDDPMScheduler):
    """DiT's DDIM, eta 0 (``dice_ds.diffusion.gaussian``)."""

    sampler = "ddim"


DEFAULTS = {"rf": DiTMoEFlowScheduler, "ddpm": DiTMoEDDPMScheduler, "ddim": DiTMoEDDIMScheduler}


def default_scheduler(sampler: str) -> DiTMoEScheduler:
    """The default scheduler object of a flavor's sampler ('rf', 'ddpm' or 'ddim').

    Every config value is passed explicitly: diffusers' ``from_config`` does not carry values a
    config records as its class's defaults (``_use_default_values``) to another class."""
    cls = DEFAULTS[sampler]
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: p.default for k, p in params.items() if k != "self"})


def is_flow(scheduler) -> bool:
    """Whether ``scheduler`` integrates a flow (velocity, sigma in [0, 1])."""
    cfg = scheduler.config
    return (isinstance(scheduler, DiTMoEFlowScheduler)
            or type(scheduler).__name__.startswith("FlowMatch")
            or (not isinstance(scheduler, DiTMoEScheduler)
                and (cfg.get("prediction_type") == "flow_prediction"
                     or bool(cfg.get("use_flow_sigmas")))))


def training_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(BETA_START, BETA_END, TRAIN_STEPS, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def check_fits(scheduler, sampler: str, model: str) -> None:
    """One ConfigError line if ``scheduler`` does not fit the model's training objective
    (``sampler``: the flavor's 'rf', 'ddpm' or 'ddim')."""
    name = type(scheduler).__name__
    needed = ("set_timesteps", "step", "config")
    if not all(hasattr(scheduler, a) for a in needed):
        example = FLOW_EXAMPLE if sampler == "rf" else EPS_EXAMPLE
        raise ConfigError(f"pipe.scheduler = {name}: not a diffusers scheduler (it needs "
                          f"{', '.join(needed)}); use e.g. {example}")
    if sampler == "rf":
        if not is_flow(scheduler):
            raise ConfigError(
                f"pipe.scheduler = {name}: a noise-prediction (DDPM-family) scheduler does not fit "
                f"{model}'s rectified-flow training (velocity ε − x0, t in [0, 1]); use {FLOW_EXAMPLE}"
                " (or DPMSolverMultistepScheduler / UniPCMultistepScheduler .from_config("
                "pipe.scheduler.config): the config sets their flow sigmas)")
        if scheduler.config.get("use_dynamic_shifting"):
            raise ConfigError(f"pipe.scheduler = {name}: use_dynamic_shifting=True needs a "
                              "resolution-dependent mu that DiT-MoE does not define; build it "
                              f"with {name}.from_config(pipe.scheduler.config)")
        return
    if is_flow(scheduler):
        raise ConfigError(
            f"pipe.scheduler = {name}: a flow-matching scheduler does not fit {model}'s DDPM "
            "training (ε-prediction, linear betas 1e-4..0.02 over 1000 steps); use "
            f"{EPS_EXAMPLE} (or DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, ...)")
    if isinstance(scheduler, DiTMoEScheduler):
        return
    prediction = scheduler.config.get("prediction_type", "epsilon")
    acp = getattr(scheduler, "alphas_cumprod", None)
    same = (acp is not None and acp.shape == (TRAIN_STEPS,) and torch.allclose(
        acp.float().cpu(), training_alphas_cumprod(), rtol=1e-4, atol=1e-7))
    if prediction != "epsilon" or not same:
        raise ConfigError(
            f"pipe.scheduler = {name}: prediction_type={prediction!r}, num_train_timesteps="
            f"{scheduler.config.get('num_train_timesteps')}, beta_schedule="
            f"{scheduler.config.get('beta_schedule')!r} do not match {model}'s training (ε, "
            f"linear betas 1e-4..0.02 over 1000 steps); build it with "
            f"{name}.from_config(pipe.scheduler.config)")


class SchedulerRule:
    """A diffusers scheduler as a ``dice_ds.diffusion.StepRule`` for one call (module docstring).

    ``channels``: the latent channels C; ``sampler``: the flavor's objective ('rf' or DDPM)."""

    draws_own_noise = True

    def __init__(self, scheduler, num_steps: int, sampler: str, channels: int,
                 learned_sigma: bool):
        self.flow = sampler == "rf"
        self.name = type(scheduler).__name__
        self.channels = channels
        template = copy.deepcopy(scheduler)
        variance = template.config.get("variance_type")
        takes = "variance_type" in inspect.signature(type(template).__init__).parameters
        self.full_output = (not self.flow and learned_sigma and variance in LEARNED and takes
                            and hasattr(template, "_get_variance"))  # DDPMScheduler's own split
        if variance in LEARNED and takes and not self.full_output:
            template.register_to_config(variance_type=None)  # it gets ε only (DiTPipeline's way)
        template.set_timesteps(num_steps)
        self.template = template
        self.raw = list(template.timesteps)
        self.num_steps = len(self.raw)
        self.guided_channels = None if self.flow else GUIDED_CHANNELS
        self.init_noise_sigma = float(getattr(template, "init_noise_sigma", 1.0))
        self._generator = "generator" in inspect.signature(template.step).parameters
        self._train_steps = float(template.config.get("num_train_timesteps", TRAIN_STEPS))
        self._draws = self._probe(2 * channels if self.full_output else channels)
        self.scheduler = None

    def timesteps(self) -> list[tuple[int, float]]:
        """(i, time fed to the model) for i = S..1."""
        scale = 1.0 / self._train_steps if self.flow else 1.0
        return [(self.num_steps - k, float(t) * scale) for k, t in enumerate(self.raw)]

    def draws_noise(self, step: int) -> bool:
        return self._draws[self.num_steps - step]

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        """A new batch: a fresh copy of the configured scheduler; the initial state."""
        self.scheduler = copy.deepcopy(self.template)
        return x * self.init_noise_sigma if self.init_noise_sigma != 1.0 else x

    def model_input(self, step: int, x: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.scheduler, "scale_model_input", None)
        return x if scale is None else scale(x, self.raw[self.num_steps - step])

    def update(self, step: int, x: torch.Tensor, out: torch.Tensor, generators) -> torch.Tensor:
        """x after step i; ``generators``: the samples' generators when the step draws noise."""
        output = out if self.full_output else out[:, :self.channels]
        kwargs = {"generator": generators} if self._generator and generators is not None else {}
        t = self.raw[self.num_steps - step]
        return self.scheduler.step(output, t, x, return_dict=False, **kwargs)[0].float()

    def _probe(self, out_channels: int) -> list[bool]:
        """Which steps draw noise (a dry run on a 1×C×1×1 state); one ConfigError line if a step
        draws anything but one latent-shaped tensor."""
        s = copy.deepcopy(self.template)
        g = torch.Generator().manual_seed(0)
        x = torch.zeros(1, self.channels, 1, 1)
        out = torch.zeros(1, out_channels, 1, 1)
        draws = []
        for t in self.raw:
            before = g.get_state()
            x_in = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
            del x_in
            kwargs = {"generator": g} if self._generator else {}
            x = s.step(out, t, x, return_dict=False, **kwargs)[0]
            drew = not torch.equal(before, g.get_state())
            if drew:
                ref = torch.Generator()
                ref.set_state(before)
                torch.randn((1, self.channels, 1, 1), generator=ref)
                if not torch.equal(ref.get_state(), g.get_state()):
                    raise ConfigError(f"pipe.scheduler = {self.name}: a step draws noise other "
                                      "than one latent-shaped tensor per sample, which the "
                                      "pipeline cannot replay on the other ranks; use a "
                                      "deterministic scheduler or DDPMScheduler")
            draws.append(drew)
        return draws
