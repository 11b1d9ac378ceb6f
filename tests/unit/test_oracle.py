"""dice_ds's DiT-MoE against the independent oracle (tests/oracle_dit_moe.py), through the loader.

The oracle's state dict uses the released key names, so every test here also exercises
``dice_ds.weights`` (reader, key map, checks, load) on the path a real checkpoint takes.
"""
import re
from dataclasses import replace

import pytest
import torch

from oracle_dit_moe import ORACLE_SIZES, OracleDiTMoE, oracle_inputs, randomize_, sincos_table

from dice_ds.config import get_flavor
from dice_ds.models import build_model
from dice_ds.weights.check import config_for_checkpoint, inspect_checkpoint
from dice_ds.weights.keymap import released_sources
from dice_ds.weights.load import load_into_model
from dice_ds.weights.read import read_state_dict
from dice_ds.weights.save import export_released_state_dict, save_checkpoint

ATOL = 1e-5  # fp32; observed max diffs are ~1e-6 (op order differs: SDPA, megatron's prob placement)

VARIANTS = {
    "debug-timm": replace(ORACLE_SIZES["debug"], flash=False),
    "debug-flash": replace(ORACLE_SIZES["debug"], flash=True),
    "E8-3blocks-timm": replace(ORACLE_SIZES["debug"], experts=8, depth=3),
    "E8-3blocks-flash": replace(ORACLE_SIZES["debug"], experts=8, depth=3, flash=True),
}


def _oracle(ocfg, seed=1):
    return randomize_(OracleDiTMoE(ocfg), seed).eval()


IMPLS = ["sequential", "grouped"]  # ModelConfig.experts_impl


def _ours_from(sd, depth=2, impl="sequential"):
    flavor = get_flavor("debug").replace(depth=depth, experts_impl=impl)
    model = build_model(config_for_checkpoint(flavor, sd))
    load_into_model(model, sd)
    return model


def _outputs(a, b, ocfg, n=8):
    x, t, y = oracle_inputs(ocfg, n, seed=5)
    with torch.no_grad():
        return a(x, t, y), b(x, t, y)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_matches_oracle(name, impl):
    ocfg = VARIANTS[name]
    oracle = _oracle(ocfg)
    ours = _ours_from(oracle.state_dict(), ocfg.depth, impl)
    assert ours.cfg.experts_impl == impl
    assert ours.cfg.num_experts == ocfg.experts and ours.cfg.depth == ocfg.depth
    assert ours.cfg.attn_layout == ("flash" if ocfg.flash else "timm")
    ref, out = _outputs(oracle, ours, ocfg)
    assert out.shape == ref.shape == (8, 8, ocfg.input_size, ocfg.input_size)
    assert ref.std() > 0.3, "outputs too small for the comparison to mean anything"
    assert (out - ref).abs().max().item() <= ATOL
    # the routing is non-trivial: several experts receive tokens in the first layer
    u = torch.randn(64, ocfg.hidden, generator=torch.Generator().manual_seed(0))
    ids, w = oracle.blocks[0].moe.route(u)
    assert len(ids.unique()) >= min(4, ocfg.experts) and (w.sum(-1) < 1).all()


def test_comparison_detects_a_swapped_projection():
    """Control: the tolerance is far below the effect of a plausible key-map bug (gate <-> up)."""
    ocfg = VARIANTS["debug-timm"]
    oracle = _oracle(ocfg)
    sd = dict(oracle.state_dict())
    g, u = "blocks.0.moe.experts.1.gate_proj.weight", "blocks.0.moe.experts.1.up_proj.weight"
    sd[g], sd[u] = sd[u], sd[g]
    ref, out = _outputs(oracle, _ours_from(sd), ocfg)
    assert (out - ref).abs().max().item() > 1e-3


def test_pos_embed_table_matches_oracle():
    """The model's own sin-cos table (used when pos_embed is regenerated) equals the MAE table."""
    ours = build_model(get_flavor("debug"))
    assert torch.allclose(ours.pos_embed[0], sincos_table(64, 4), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_export_round_trip_is_exact(impl):
    ocfg = VARIANTS["debug-flash"]
    oracle = _oracle(ocfg)
    exported = export_released_state_dict(_ours_from(oracle.state_dict(), impl=impl))
    ref = oracle.state_dict()
    assert exported.keys() == ref.keys()
    assert all(torch.equal(exported[k], ref[k]) for k in ref)


@pytest.mark.parametrize("form", ["raw", "ema", "model", "ema+model", "safetensors"])
def test_released_file_forms(tmp_path, form):
    ocfg = VARIANTS["debug-timm"]
    oracle = _oracle(ocfg)
    sd = oracle.state_dict()
    decoy = _oracle(ocfg, seed=99).state_dict()  # the non-EMA weights of a training checkpoint
    path = tmp_path / ("ckpt.safetensors" if form == "safetensors" else "ckpt.pt")
    if form == "safetensors":
        save_checkpoint(_ours_from(sd), path)
    else:
        obj = {"raw": sd, "ema": {"ema": sd}, "model": {"model": sd},
               "ema+model": {"model": decoy, "ema": sd, "opt": {}}}[form]
        torch.save(obj, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    ref, out = _outputs(oracle, _ours_from(loaded), ocfg)
    assert (out - ref).abs().max().item() <= ATOL


def test_fp16_storage_round_trip(tmp_path):
    ocfg = VARIANTS["debug-timm"]
    path = save_checkpoint(_ours_from(_oracle(ocfg).state_dict()), tmp_path / "half.pt",
                           dtype=torch.float16)
    loaded = read_state_dict(path)
    assert {v.dtype for v in loaded.values()} == {torch.float16}
    assert len(loaded) == len(_oracle(ocfg).state_dict())


# ----------------------------------------------------------------------------- real key tables
def _meta_ours(cfg):
    from dice_ds import mcore
    from dice_ds.models.dit_moe import DiTMoE
    from dice_ds.parallel.groups import local_model_groups

    pg = mcore.process_groups(local_model_groups())  # prepared by tests/conftest.py
    with torch.device("meta"):
        return DiTMoE(cfg, pg)


def _narrowed(shapes, per):
    """The key shapes of an EP shard holding ``per`` experts per layer, from the whole model's."""
    out = {}
    for key, shape in shapes.items():
        if m := re.search(r"\.local_experts\.(\d+)\.", key):
            if int(m.group(1)) < per:
                out[key] = shape
        elif key.endswith(("moe.experts.fc1_weight", "moe.experts.fc2_weight")):
            out[key] = (per, *shape[1:])
        else:
            out[key] = shape
    return out


def _filled_by(shapes, local):
    """Released key -> the shape of the model region it fills, through the one key map; no
    released key may fill two regions."""
    filled = {}
    for key, shape in shapes.items():
        for rkey, index, rows in released_sources(key, shape, local):
            region = shape[1:] if index is not None else shape
            if rows is not None:
                region = (rows[1] - rows[0], *region[1:])
            assert rkey not in filled, f"{rkey} fills two model regions"
            filled[rkey] = tuple(region)
    return filled


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,count", [("DiT-S/2", 420), ("DiT-XL/2", 1076), ("DiT-G/2", 2492)])
def test_real_key_table(name, count, impl):
    """At the real sizes (meta device; timm E=8, flash E=8 and flash E=16) every model tensor is
    filled exactly by released tensors of equal shape, for the whole model and for each EP rank's
    shard (EP 2 and 4: contiguous experts), and nothing else of the checkpoint is read."""
    with torch.device("meta"):
        released = OracleDiTMoE(ORACLE_SIZES[name]).state_dict()
    assert len(released) == count
    flavor = get_flavor(name)
    cfg = config_for_checkpoint(flavor, released)
    assert cfg == flavor  # the flavor table agrees with the released checkpoint
    facts = inspect_checkpoint(released)
    assert facts["attn_layout"] == flavor.attn_layout and facts["learn_sigma"]
    assert facts["num_experts"] == ORACLE_SIZES[name].experts and facts["input_size"] == 32
    ours = {k: tuple(v.shape) for k, v in _meta_ours(cfg.replace(experts_impl=impl)).state_dict().items()
            if not k.endswith("._extra_state")}
    shapes = {k: tuple(v.shape) for k, v in released.items()}
    e = cfg.num_experts
    assert _filled_by(ours, range(e)) == shapes
    for world in (2, 4):
        per = e // world
        for r in range(world):
            local = range(r * per, (r + 1) * per)
            want = {k: s for k, s in shapes.items()
                    if not (m := re.match(r"^blocks\.\d+\.moe\.experts\.(\d+)\.", k))
                    or int(m.group(1)) in local}
            assert _filled_by(_narrowed(ours, per), local) == want
