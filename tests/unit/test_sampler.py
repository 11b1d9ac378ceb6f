"""Step rules run by the pipeline's loop: RF Euler, DDPM and DDIM step schedules, closed-form/oracle
results, the loop's runtime calls (also on an exception), noise draws, seeding."""
import math

import pytest
import torch
from torch import nn

from dice_ds.diffusion import (
    draw_conditions,
    labels_for,
    noise_draws,
    predict,
    sample_seed,
    step_rule,
)
from dice_ds.diffusion.gaussian import ddpm_mean_logvar, spaced_schedule, spaced_timesteps
from dice_ds.diffusion.rf import rf_times
from dice_ds.lifecycle import BatchLifecycle
from dice_ds.parallel.plan import ParallelPlan
from dice_ds.pipeline.denoise import LoopPosition, denoise
from dice_ds.schedule import Schedule


class Recorder(BatchLifecycle):
    """Stand-in runtime that records the calls the loop makes."""

    def __init__(self):
        self.calls = []

    def _start(self, schedule):
        self.calls.append(("start", schedule.num_steps))

    def begin_step(self, i):
        self.calls.append(i)

    def _finish(self):
        self.calls.append("finish")

    def _abort(self):
        self.calls.append("abort")


def sample(name, model, z, y, steps, cfg_scale=1.0, runtime=None, generators=None):
    """The pipeline's loop on one batch, with the schedule of a plain plan when a runtime runs."""
    sched = Schedule.build(ParallelPlan(), steps, 1) if runtime is not None else None
    return denoise(step_rule(name, steps), model, z, y, cfg_scale, runtime=runtime,
                   schedule=sched, generators=generators)


class LinearVelocity(nn.Module):
    """v(z) = a·z on the first C channels (zeros on the sigma channels); records t and CFG calls."""

    def __init__(self, a=0.5, channels=4):
        super().__init__()
        self.a, self.c = a, channels
        self.w = nn.Parameter(torch.zeros(1))
        self.ts, self.cfg_calls = [], []

    def forward(self, x, t, y):
        self.ts.append(t.clone())
        return torch.cat([self.a * x, torch.zeros_like(x)], dim=1)

    def forward_with_cfg(self, x, t, y, scale, guided_channels=None):
        self.cfg_calls.append((scale, guided_channels))
        return self(x, t, y)


class OracleEps(nn.Module):
    """ε-prediction that is exact for a known x0: ε = (x_t − √ᾱ_t·x0) / √(1 − ᾱ_t); variance v."""

    def __init__(self, x0, v=0.0):
        super().__init__()
        self.x0, self.v = x0, v
        self.acp = spaced_schedule(1000).alphas_cumprod
        self.w = nn.Parameter(torch.zeros(1))
        self.ts = []

    def forward(self, x, t, y):
        self.ts.append(int(t[0]))
        acp = self.acp[t.long()].float().view(-1, 1, 1, 1)
        x0 = self.x0[: x.shape[0]] if self.x0.shape[0] >= x.shape[0] else self.x0
        eps = (x - acp.sqrt() * x0) / (1 - acp).sqrt()
        return torch.cat([eps, torch.full_like(x, self.v)], dim=1)


def test_rf_times_count_down_and_honour_any_step_count():
    t50 = rf_times(50)
    assert t50[0] == (50, 1.0) and t50[-1] == (1, 0.02) and len(t50) == 50
    assert [i for i, _ in rf_times(7)] == [7, 6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_rf_euler_matches_closed_form(steps):
    model, rt = LinearVelocity(a=0.5), Recorder()
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample("rf", model, z, torch.zeros(3, dtype=torch.long), steps, runtime=rt)
    torch.testing.assert_close(out, z * (1 - 0.5 / steps) ** steps, rtol=1e-5, atol=1e-6)
    assert [float(t[0]) for t in model.ts] == pytest.approx([i / steps for i in range(steps, 0, -1)])
    assert rt.calls == [("start", steps)] + list(range(steps, 0, -1)) + ["finish"]
    assert model.cfg_calls == []  # scale 1: plain forward, no doubled batch


def test_cfg_goes_through_one_merged_forward_with_the_right_channels():
    model = LinearVelocity()
    z, y = torch.randn(2, 4, 4, 4), torch.zeros(2, dtype=torch.long)
    sample("rf", model, z, y, 3, cfg_scale=1.5)
    assert model.cfg_calls == [(1.5, None)] * 3  # RF guides all 4 channels
    model = LinearVelocity()
    sample("ddim", model, z, y, 3, cfg_scale=4.0)
    assert model.cfg_calls == [(4.0, 3)] * 3  # DDPM/DDIM: the first 3 channels (DiT)


def test_rf_on_the_debug_model_equals_a_hand_written_euler_loop():
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights

    model = init_weights(build_model(get_flavor("debug")), "random", seed=1)
    z, y, _ = draw_conditions(5, [0, 1], 4, 8, 1000)
    out = sample("rf", model, z, y, 3, cfg_scale=2.0)
    ref = z.clone()
    with torch.no_grad():
        for i in (3, 2, 1):
            ref = ref - (1 / 3) * model.forward_with_cfg(ref, torch.full((2,), i / 3), y, 2.0)[:, :4]
    assert torch.equal(out, ref) and out.abs().sum() > 0


def test_spaced_timesteps_follow_the_rounding_rule():
    ts = spaced_timesteps(250)
    assert len(ts) == 250 and ts[:3] == [0, 4, 8] and ts[-1] == 999
    assert ts == [round(k * 999 / 249) for k in range(250)]
    assert spaced_timesteps(5) == [0, 250, 500, 749, 999]
    assert spaced_timesteps(1000) == list(range(1000)) and spaced_timesteps(1) == [0]
    with pytest.raises(ValueError):
        spaced_timesteps(1001)


def test_schedule_values():
    full = spaced_schedule(1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(full.betas, betas, rtol=1e-10, atol=1e-12)
    sub = spaced_schedule(10)
    acp = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(sub.alphas_cumprod, acp[sub.timesteps])
    # respaced betas reproduce the kept alphas_cumprod
    torch.testing.assert_close(torch.cumprod(1 - sub.betas, 0), sub.alphas_cumprod)
    assert float(sub.posterior_mean_coef1[0]) == pytest.approx(1.0)
    assert float(sub.posterior_mean_coef2[0]) == pytest.approx(0.0)


def test_learned_range_variance_interpolates_between_the_two_bounds():
    sched = spaced_schedule(10)
    x, k = torch.randn(1, 4, 2, 2), 5
    for v, expected in ((1.0, math.log(float(sched.betas[k]))),
                        (-1.0, float(sched.posterior_log_variance_clipped[k]))):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        _, log_var = ddpm_mean_logvar(sched, k, x, out)
        torch.testing.assert_close(log_var, torch.full_like(x, expected))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_gaussian_samplers_recover_x0_from_an_oracle(sampler):
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    model, rt = OracleEps(x0, v=0.3), Recorder()
    z, y, gens = draw_conditions(0, [0, 1], 4, 4, 1000)
    out = sample(sampler, model, z, y, 5, runtime=rt, generators=gens)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert model.ts == [999, 749, 500, 250, 0]
    assert rt.calls == [("start", 5), 5, 4, 3, 2, 1, "finish"]


def test_ddpm_noise_depends_on_the_sample_not_the_batch():
    x0 = torch.zeros(1, 4, 4, 4)

    class Noisy(OracleEps):  # wrong ε on purpose, so the injected noise shows in the result
        def forward(self, x, t, y):
            out = super().forward(x, t, y)
            return torch.cat([out[:, :4] * 0.5, out[:, 4:]], dim=1)

    z, y, gens = draw_conditions(3, [10, 11, 12], 4, 4, 1000)
    batch = sample("ddpm", Noisy(x0, v=1.0), z, y, 8, generators=gens)
    z1, y1, g1 = draw_conditions(3, [11], 4, 4, 1000)
    alone = sample("ddpm", Noisy(x0, v=1.0), z1, y1, 8, generators=g1)
    assert torch.equal(batch[1:2], alone)
    with pytest.raises(ValueError, match="draws noise"):
        sample("ddpm", Noisy(x0), z, y, 8)


def test_rules_declare_their_noise_draws():
    assert [noise_draws(step_rule(n, 7)) for n in ("rf", "ddpm", "ddim")] == [0, 6, 0]
    ddpm = step_rule("ddpm", 4)
    assert [i for i, _ in ddpm.timesteps() if ddpm.draws_noise(i)] == [4, 3, 2]
    with pytest.raises(ValueError, match="sampler"):
        step_rule("euler", 4)


def test_the_loop_aborts_the_batch_on_an_exception_and_reports_its_step():
    class Failing(LinearVelocity):
        def forward(self, x, t, y):
            if len(self.ts) == 2:
                raise RuntimeError("injected")
            return super().forward(x, t, y)

    rt, position = Recorder(), LoopPosition()
    z, y = torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="injected"):
        denoise(step_rule("rf", 5), Failing(), z, y, runtime=rt,
                schedule=Schedule.build(ParallelPlan(), 5, 1), position=position)
    assert rt.calls == [("start", 5), 5, 4, 3, "abort"] and not rt.in_batch
    assert position.describe() == "step 3/5"
    with pytest.raises(ValueError, match="schedule of 5 steps"):
        denoise(step_rule("rf", 5), LinearVelocity(), z, y, runtime=rt,
                schedule=Schedule.build(ParallelPlan(), 4, 1))


def test_initial_conditions_are_a_function_of_seed_and_index():
    z, y, _ = draw_conditions(7, [3, 4, 5], 4, 8, 1000)
    z2, y2, _ = draw_conditions(7, [5, 3], 4, 8, 1000)
    assert torch.equal(z[2], z2[0]) and torch.equal(z[0], z2[1]) and y[2] == y2[0]
    assert not torch.equal(z[0], z[1])
    assert labels_for(7, [3, 4, 5], 1000) == y.tolist()
    assert sample_seed(1, 0) != sample_seed(0, 1) and sample_seed(0, 5) == 5
    assert len({sample_seed(s, i) for s in range(3) for i in range(50_000)}) == 150_000
    z3, _, _ = draw_conditions(8, [3], 4, 8, 1000)
    assert not torch.equal(z3[0], z[0])


def test_predict_casts_to_the_model_dtype_and_returns_fp32():
    model = LinearVelocity().to(torch.bfloat16)
    out = predict(model, torch.randn(1, 4, 2, 2), torch.ones(1), torch.zeros(1, dtype=torch.long), 1.0)
    assert out.dtype == torch.float32 and out.shape == (1, 8, 2, 2)
