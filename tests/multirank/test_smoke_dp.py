"""Smoke: two gloo ranks each build the debug model; identical seeds give identical outputs."""
import torch

from distributed import run_ranks


def _forward(rank, world):
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.groups import local_model_groups

    model = init_weights(build_model(get_flavor("debug"), local_model_groups()), "random", seed=3)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 2])
    with torch.no_grad():
        return model(x, t, y)


def test_two_ranks_build_and_agree(tmp_path):
    a, b = run_ranks(_forward, 2, tmp_path)
    assert torch.equal(a, b) and a.abs().sum() > 0
