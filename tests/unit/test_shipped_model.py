"""The shipped digits DiT-MoE: size and released key format, loading through the normal loader, and a
2-step rectified-flow sample that the shipped classifier recognises above chance."""

from __future__ import annotations

import json

import pytest
import torch

from dice_ds.eval.classifier import ASSETS, load_classifier

MODEL = ASSETS / "digits_dit_moe.pt"


@pytest.fixture(scope="module")
def model():
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model
    from dice_ds.weights.check import config_for_checkpoint
    from dice_ds.weights.load import load_into_model
    from dice_ds.weights.read import open_checkpoint

    with open_checkpoint(MODEL) as reader:  # as a run reads it: shapes first, then the tensors
        cfg = config_for_checkpoint(get_flavor("digits"), reader.meta_state_dict())
        m = build_model(cfg)
        load_into_model(m, reader)
    return m.eval()


def test_checkpoint_is_small_and_in_released_format():
    assert MODEL.stat().st_size <= 5 * 2**20
    raw = torch.load(MODEL, map_location="cpu", weights_only=True)
    sd = raw["ema"]
    assert sd["blocks.0.moe.gate.weight"].shape == (8, 64)
    assert "blocks.3.moe.experts.7.down_proj.weight" in sd
    assert "blocks.0.moe.shared_experts.gate_proj.weight" in sd
    assert "blocks.0.attn.Wqkv.weight" in sd and sd["pos_embed"].shape == (1, 64, 64)
    assert all(v.dtype == torch.float16 for v in sd.values())
    meta = json.loads(MODEL.with_suffix(".json").read_text())
    assert meta["flavor"] == "digits" and "command" in meta


def test_checkpoint_facts_match_the_flavor():
    from dice_ds.config import get_flavor
    from dice_ds.weights.check import inspect_checkpoint
    from dice_ds.weights.read import open_checkpoint

    with open_checkpoint(MODEL) as reader:
        facts = inspect_checkpoint(reader.meta_state_dict())
    cfg = get_flavor("digits")
    assert (facts["num_experts"], facts["depth"], facts["in_channels"], facts["num_classes"],
            facts["input_size"], facts["attn_layout"], facts["learn_sigma"]) == (
        cfg.num_experts, cfg.depth, cfg.in_channels, cfg.num_classes, cfg.input_size,
        cfg.attn_layout, cfg.learn_sigma)


def test_two_step_samples_classify_above_chance(model):
    from dice_ds.data import from_uint8, to_uint8
    from dice_ds.diffusion import draw_conditions, step_rule
    from dice_ds.eval.classifier import classify
    from dice_ds.pipeline.denoise import denoise

    z, y, _ = draw_conditions(0, list(range(40)), 1, 16, 10)
    x = denoise(step_rule("rf", 2), model, z, y, 1.5)
    _, pred = classify(load_classifier(), from_uint8(to_uint8(x)))
    acc = (pred == y).float().mean().item()
    assert acc > 0.5, f"2-step class accuracy {acc:.2f} is not above chance (0.1)"
