"""dice_ds.weights: error messages, the key map and per-EP-rank loads (no process groups), layouts,
round trips. State dicts built here reach the loader through the one reader (``InMemoryReader``)."""
import argparse
import re

import pytest
import torch

from oracle_dit_moe import ORACLE_SIZES, OracleDiTMoE, randomize_, sincos_table

from dice_ds.config import ConfigError, get_flavor
from dice_ds.models import build_model, init_weights
from dice_ds.weights.check import config_for_checkpoint, inspect_checkpoint
from dice_ds.weights.keymap import released_sources
from dice_ds.weights.load import CheckpointMismatchError, load_into_model
from dice_ds.weights.read import InMemoryReader, open_checkpoint
from dice_ds.weights.save import export_released_state_dict

DEBUG = get_flavor("debug").replace(experts_impl="sequential")  # the per-expert key layout


@pytest.fixture(scope="module")
def released():
    """A released-format debug state dict (E=4, depth 2, timm layout) with random weights."""
    return randomize_(OracleDiTMoE(ORACLE_SIZES["debug"]), seed=2).state_dict()


@pytest.fixture(scope="module")
def released_e8():
    from dataclasses import replace

    return randomize_(OracleDiTMoE(replace(ORACLE_SIZES["debug"], experts=8)), 4).state_dict()


def _mismatch(model, sd) -> str:
    with pytest.raises(CheckpointMismatchError) as info:
        load_into_model(model, sd)
    assert isinstance(info.value, ConfigError)
    return str(info.value)


# ----------------------------------------------------------------------------- error messages
def test_missing_key(released):
    sd = {k: v for k, v in released.items() if k != "blocks.1.attn.proj.bias"}
    msg = _mismatch(build_model(DEBUG), sd)
    assert "1 missing: blocks.1.attn.proj.bias" in msg and "--model debug" in msg


def test_missing_expert_projection(released):
    sd = {k: v for k, v in released.items() if k != "blocks.0.moe.experts.2.down_proj.weight"}
    assert "blocks.0.moe.experts.2.down_proj.weight" in _mismatch(build_model(DEBUG), sd)


def test_unexpected_keys(released):
    sd = dict(released, **{"blocks.0.extra.weight": torch.zeros(1),
                           "blocks.0.moe.experts.7.down_proj.weight": torch.zeros(64, 256),
                           "blocks.0.moe.experts.7.gate_proj.weight": torch.zeros(256, 64),
                           "blocks.0.moe.experts.7.up_proj.weight": torch.zeros(256, 64)})
    msg = _mismatch(build_model(DEBUG), sd)
    assert "4 unexpected: blocks.0.extra.weight, blocks.0.moe.experts.7.down_proj.weight" in msg


def test_shape_mismatch(released):
    sd = dict(released)
    sd["final_layer.linear.bias"] = torch.zeros(31)
    msg = _mismatch(build_model(DEBUG), sd)
    assert "1 shape mismatch: final_layer.linear.bias: ckpt [31] vs model [32]" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_wrong_num_experts(released):
    with pytest.raises(ConfigError, match=re.escape(
            "--num-experts 16 but the checkpoint has 4 experts; drop the flag")):
        config_for_checkpoint(DEBUG, released, num_experts=16)
    assert config_for_checkpoint(DEBUG, released, num_experts=4).num_experts == 4


def test_model_size_mismatch_names_both(released):
    with pytest.raises(ConfigError, match="--model DiT-S/2 has depth=12 but the checkpoint has depth=2"):
        config_for_checkpoint(get_flavor("DiT-S/2"), released)
    with pytest.raises(ConfigError, match="hidden_size=128 but the checkpoint has hidden_size=64"):
        config_for_checkpoint(DEBUG.replace(hidden_size=128), released)


def test_flash_head_count_mismatch():
    from dataclasses import replace

    sd = OracleDiTMoE(replace(ORACLE_SIZES["debug"], flash=True, heads=8)).state_dict()
    with pytest.raises(ConfigError, match="4 heads but the checkpoint's q_norm implies 8"):
        config_for_checkpoint(DEBUG, sd)


def test_missing_file_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="--ckpt .*nope.pt: no such file"):
        open_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="not a state dict"):
        open_checkpoint(tmp_path / "list.pt")
    torch.save({"ema": {"w": torch.ones(1)}, "obj": _Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="weights_only=True"):
        open_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="not a DiT-MoE state dict"):
        inspect_checkpoint({"w": torch.ones(1)})


class _Opaque:
    pass


def test_training_checkpoint_with_args_namespace(tmp_path, released):
    torch.save({"model": {}, "ema": released, "args": argparse.Namespace(model="DiT-S/2")},
               tmp_path / "train.pt")
    with open_checkpoint(tmp_path / "train.pt") as reader:
        assert set(reader.keys()) == set(released)
        assert torch.equal(reader.read("pos_embed"), released["pos_embed"])


# ----------------------------------------------------------------------------- key map, EP ranks
def _shard(model, ids):
    """Narrow every MoE layer to experts ``ids`` the way an EP rank holds them (no groups needed)."""
    for moe in model.moe_layers():
        moe.experts.local_experts = torch.nn.ModuleList(moe.experts.local_experts[: len(ids)])
        moe.local_expert_indices = list(ids)
    return model


@pytest.mark.parametrize("local", [[4, 5, 6, 7], [1, 5]])  # EP rank 1 of 2 at E=8; round-robin
def test_released_sources_name_each_local_expert(local):
    f, d = 256, 64
    for i, e in enumerate(local):
        assert released_sources(f"blocks.1.moe.experts.local_experts.{i}.linear_fc1.weight",
                                (2 * f, d), local) == [
            (f"blocks.1.moe.experts.{e}.gate_proj.weight", None, (0, f)),
            (f"blocks.1.moe.experts.{e}.up_proj.weight", None, (f, 2 * f))]
        assert released_sources(f"blocks.1.moe.experts.local_experts.{i}.linear_fc2.weight",
                                (d, f), local) == [(f"blocks.1.moe.experts.{e}.down_proj.weight",
                                                    None, None)]
    assert released_sources("blocks.0.moe.experts.fc2_weight", (len(local), d, f), local) == [
        (f"blocks.0.moe.experts.{e}.down_proj.weight", i, None) for i, e in enumerate(local)]
    assert released_sources("blocks.0.moe.experts.fc1_weight", (len(local), 2 * f, d), local)[2:4] \
        == [(f"blocks.0.moe.experts.{local[1]}.gate_proj.weight", 1, (0, f)),
            (f"blocks.0.moe.experts.{local[1]}.up_proj.weight", 1, (f, 2 * f))]
    assert released_sources("blocks.0.moe.router.weight", (8, d), local) == [
        ("blocks.0.moe.gate.weight", None, None)]
    assert released_sources("blocks.0.moe.shared_experts.linear_fc1.weight", (256, d), local) == [
        ("blocks.0.moe.shared_experts.gate_proj.weight", None, (0, 128)),
        ("blocks.0.moe.shared_experts.up_proj.weight", None, (128, 256))]
    assert released_sources("blocks.0.attn.qkv.weight", (192, d), local) == [
        ("blocks.0.attn.qkv.weight", None, None)]


@pytest.mark.parametrize("n_experts,world", [(8, 4), (4, 2), (8, 8), (8, 1)])
def test_each_ep_rank_loads_its_contiguous_experts(released_e8, n_experts, world):
    sd = released_e8 if n_experts == 8 else {
        k: v for k, v in released_e8.items() if not re.search(r"\.experts\.[4-7]\.", k)}
    if n_experts == 4:
        sd = {k: (v[:4] if k.endswith("moe.gate.weight") else v) for k, v in sd.items()}
    per = n_experts // world
    loaded = set()
    for r in range(world):
        local = list(range(r * per, (r + 1) * per))
        model = _shard(build_model(DEBUG.replace(num_experts=n_experts)), local)
        result = load_into_model(model, sd)
        assert result.local_experts == tuple(local)
        # the reference's own consistency check: every other rank's expert tensors are dropped
        assert result.dropped_expert_keys == 3 * DEBUG.depth * per * (world - 1)
        for b in range(DEBUG.depth):
            experts = model.blocks[b].moe.experts.local_experts
            assert len(experts) == per
            for i, e in enumerate(local):
                pre = f"blocks.{b}.moe.experts.{e}."
                assert torch.equal(experts[i].linear_fc1.weight, torch.cat(
                    [sd[pre + "gate_proj.weight"], sd[pre + "up_proj.weight"]]))
                assert torch.equal(experts[i].linear_fc2.weight, sd[pre + "down_proj.weight"])
                loaded.add((b, e))
    assert loaded == {(b, e) for b in range(DEBUG.depth) for e in range(n_experts)}


def test_strided_placement(released_e8):
    """The reference places experts round-robin; an explicit id list loads them in local order."""
    model = _shard(build_model(DEBUG.replace(num_experts=8)), [1, 5])
    assert load_into_model(model, InMemoryReader(released_e8)).dropped_expert_keys == 6 * 2 * 3
    experts = model.blocks[0].moe.experts.local_experts
    assert len(experts) == 2
    assert torch.equal(experts[1].linear_fc2.weight,
                       released_e8["blocks.0.moe.experts.5.down_proj.weight"])
    assert torch.equal(experts[0].linear_fc2.weight,
                       released_e8["blocks.0.moe.experts.1.down_proj.weight"])


def test_load_into_ep_shard_keeps_only_its_experts(released):
    model = _shard(build_model(DEBUG), [2, 3])
    result = load_into_model(model, released)
    assert result.local_experts == (2, 3) and result.dropped_expert_keys == 2 * 3 * 2
    for b in range(2):
        experts = model.blocks[b].moe.experts.local_experts
        for i, e in enumerate((2, 3)):
            assert torch.equal(experts[i].linear_fc2.weight,
                               released[f"blocks.{b}.moe.experts.{e}.down_proj.weight"])
    # the shard's own (dice_ds-layout) state dict loads into another rank-2 shard as it is
    other = _shard(build_model(DEBUG), [2, 3])
    load_into_model(other, model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


# ----------------------------------------------------------------------------- layouts, sizes
def test_export_load_round_trip():
    a = init_weights(build_model(DEBUG), "random", seed=7)
    b = build_model(DEBUG)
    load_into_model(b, export_released_state_dict(a))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 1000])
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))


def test_dice_layout_with_or_without_extra_state():
    a = init_weights(build_model(DEBUG), "random", seed=8)
    for sd in (a.state_dict(), {k: v for k, v in a.state_dict().items()
                                if not k.endswith("_extra_state")}):
        b = build_model(DEBUG)
        load_into_model(b, sd)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_other_image_size_regenerates_pos_embed(released):
    model = build_model(DEBUG.replace(input_size=16))  # 8x8 token grid; checkpoint has 4x4
    with pytest.warns(UserWarning, match="performance testing only"):
        result = load_into_model(model, released)
    assert result.regenerated_pos_embed
    assert torch.allclose(model.pos_embed[0], sincos_table(64, 8), atol=1e-6)
    assert torch.equal(model.blocks[0].moe.router.weight, released["blocks.0.moe.gate.weight"])


def test_non_strict_load_reports(released):
    sd = {k: v for k, v in released.items() if k != "final_layer.linear.bias"}
    model = build_model(DEBUG)
    with pytest.warns(UserWarning, match="1 missing"):
        result = load_into_model(model, sd, strict=False)
    assert result.missing == ("final_layer.linear.bias",)


def test_inspect_reads_everything(released):
    assert inspect_checkpoint(released) == {
        "num_experts": 4, "depth": 2, "hidden_size": 64, "attn_layout": "timm", "head_dim": None,
        "patch_size": 2, "in_channels": 4, "num_classes": 1000, "input_size": 8,
        "learn_sigma": True, "out_channels": 8, "expert_ffn_size": 256, "shared_ffn_size": 128}
    dice_sd = build_model(DEBUG).state_dict()
    assert inspect_checkpoint(dice_sd) == inspect_checkpoint(released)
