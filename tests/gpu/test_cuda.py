"""CUDA checks (skipped without a GPU): the model and the DICE runtime on a CUDA device.

No GPU was available where this suite was written, so these run only on a CUDA machine:
``python -m pytest -q tests/gpu``. They check that nothing in the CPU path is CUDA-incompatible:
the megatron patches are NOT applied, bf16 sampling of the debug and XL/2 (random weights, batch 1)
flavors is finite, and the runtime's phase timers use CUDA events.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("flavor,side", [("debug", 8), ("DiT-XL/2", 32)])
def test_bf16_rf_sampling_on_cuda_is_finite(flavor, side):
    from dice_ds.config import get_flavor
    from dice_ds.diffusion import step_rule
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.apply import parallelize_dit_moe
    from dice_ds.parallel.groups import local_model_groups
    from dice_ds.parallel.plan import ParallelPlan
    from dice_ds.patches.megatron_cpu import patches_applied
    from dice_ds.pipeline.denoise import denoise
    from dice_ds.schedule import Schedule

    cfg = get_flavor(flavor).replace(input_size=side)
    model = build_model(cfg, params_dtype=torch.bfloat16, device="cuda")
    assert not patches_applied()
    init_weights(model, "random", seed=0)
    runtime = parallelize_dit_moe(model, ParallelPlan(), local_model_groups())
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(1, cfg.in_channels, side, side, device="cuda", generator=g)
    y = torch.tensor([1], device="cuda")
    out = denoise(step_rule("rf", 2), model, z, y, 1.5, runtime=runtime,
                  schedule=Schedule.build(ParallelPlan(), 2, cfg.depth))
    assert out.is_cuda and torch.isfinite(out).all()
    assert runtime.stats()["phase_seconds"]
