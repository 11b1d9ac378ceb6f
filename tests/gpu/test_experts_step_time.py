"""XL/2 bf16 step time on one GPU, sequential vs grouped experts (skipped without a CUDA device).

A measurement, not a check of speed: it prints the median seconds of one CFG model step (batch 8 →
16 rows of 256 tokens through 28 layers, random weights) for ``ModelConfig.experts_impl``
'sequential' (megatron's ``SequentialMLP``) and 'grouped' (``dice_ds/models/experts.py``; on
compute capability >= 9.0 in bf16 it runs ``torch._grouped_mm``'s CUDA kernel, elsewhere a
per-expert loop), interleaved, and asserts only that both give finite, close outputs.

    python -m pytest -q -s tests/gpu/test_experts_step_time.py
"""
import statistics

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BATCH, WARMUP, ROUNDS = 8, 2, 7


def _step_seconds(model, z, t, y) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    model.forward_with_cfg(z, t, y, 1.5)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@torch.inference_mode()
def test_xl2_bf16_step_time_sequential_vs_grouped():
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights

    cfg = get_flavor("DiT-XL/2")
    models = {impl: init_weights(build_model(cfg.replace(experts_impl=impl),
                                             params_dtype=torch.bfloat16, device="cuda"),
                                 "random", seed=0)
              for impl in ("sequential", "grouped")}
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(BATCH, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda",
                    generator=g).to(torch.bfloat16)
    t = torch.full((BATCH,), 0.5, device="cuda")
    y = torch.arange(BATCH, device="cuda")
    outs = {k: m.forward_with_cfg(z, t, y, 1.5).float() for k, m in models.items()}
    assert all(torch.isfinite(o).all() for o in outs.values())
    rel = ((outs["grouped"] - outs["sequential"]).norm() / outs["sequential"].norm()).item()
    assert rel < 2e-2, rel  # bf16, different GEMM kernels
    for _ in range(WARMUP):
        for m in models.values():
            _step_seconds(m, z, t, y)
    times = {k: [] for k in models}
    names = list(models)
    for r in range(ROUNDS):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(_step_seconds(models[k], z, t, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nXL/2 bf16 CFG step, batch {BATCH}, {torch.cuda.get_device_name()}: "
          f"sequential {med['sequential'] * 1e3:.1f} ms, grouped {med['grouped'] * 1e3:.1f} ms, "
          f"grouped/sequential {med['grouped'] / med['sequential']:.3f}; outputs rel diff {rel:.1e}")
