"""The streaming loader (dice_ds/weights) against the whole-dict loader it replaced, bit for bit.

Every layout that loaded before must load to the same bytes: released and dice_ds key layouts
(sequential and grouped experts, whole models and EP shards), E = 4/8/16, timm and flash attention,
the ``.pt`` forms (raw dict, ``{"ema": sd}``, ``{"model": sd}``, a training file holding both, of
which the EMA weights load), torch's legacy non-zip ``.pt`` and ``.safetensors``, into fp32 and
bf16 models holding every expert or a shard. The reference is the whole-dict path the loader
replaced: the model's state dict assembled here from the released tensors by the key table written
out in ``_expected`` (independent of ``dice_ds/weights/keymap.py``), then ``load_state_dict``.
"""
import re

import pytest
import torch
from safetensors.torch import save_file

from dice_ds.config import get_flavor
from dice_ds.models import build_model, init_weights
from dice_ds.weights.keymap import is_dice_layout, mcore_to_released
from dice_ds.weights.load import load_into_model, local_expert_ids, time_plain_read
from dice_ds.weights.read import open_checkpoint
from dice_ds.weights.save import export_released_state_dict

FLAVORS = {
    "debug-e4-timm": get_flavor("debug"),
    "debug-e8-timm": get_flavor("debug").replace(num_experts=8),
    "debug-e16-timm": get_flavor("debug").replace(num_experts=16),
    "digits-e8-flash": get_flavor("digits"),
}


def _narrow(model, ids):
    """Keep experts ``ids`` in every MoE layer, as an EP rank holds them (no groups needed)."""
    for moe in model.moe_layers():
        ex = moe.experts
        if getattr(ex, "stacked_weights", False):
            ex.fc1_weight = torch.nn.Parameter(ex.fc1_weight.data[: len(ids)].clone())
            ex.fc2_weight = torch.nn.Parameter(ex.fc2_weight.data[: len(ids)].clone())
            ex.num_local_experts = len(ids)
        else:
            ex.local_experts = torch.nn.ModuleList(ex.local_experts[: len(ids)])
        moe.local_expert_indices = list(ids)
    return model


def _model(cfg, impl, dtype, ids=None, seed=None):
    m = build_model(cfg.replace(experts_impl=impl), params_dtype=dtype)
    if seed is not None:
        init_weights(m, "random", seed=seed)
    return _narrow(m, ids) if ids is not None else m


def _expected(model, released):
    """The model's tensors from a released state dict: the key table of the released DiT-MoE code,
    written out (router = gate; an expert's fc1 = cat(gate_proj, up_proj), fc2 = down_proj; grouped
    layers stack this rank's experts in local order; shared experts alike; the rest by name)."""
    local = local_expert_ids(model)

    def fc(prefix, which):
        if which == "2":
            return released[f"{prefix}.down_proj.weight"]
        return torch.cat([released[f"{prefix}.gate_proj.weight"], released[f"{prefix}.up_proj.weight"]])

    out = {}
    for key in model.state_dict():
        if key.endswith("._extra_state"):
            continue
        if m := re.match(r"^blocks\.(\d+)\.moe\.router\.weight$", key):
            out[key] = released[f"blocks.{m.group(1)}.moe.gate.weight"]
        elif m := re.match(r"^blocks\.(\d+)\.moe\.experts\.fc([12])_weight$", key):
            out[key] = torch.stack([fc(f"blocks.{m.group(1)}.moe.experts.{e}", m.group(2))
                                    for e in local])
        elif m := re.match(r"^blocks\.(\d+)\.moe\.experts\.local_experts\.(\d+)\.linear_fc([12])"
                           r"\.weight$", key):
            out[key] = fc(f"blocks.{m.group(1)}.moe.experts.{local[int(m.group(2))]}", m.group(3))
        elif m := re.match(r"^blocks\.(\d+)\.moe\.shared_experts\.linear_fc([12])\.weight$", key):
            out[key] = fc(f"blocks.{m.group(1)}.moe.shared_experts", m.group(2))
        else:
            out[key] = released[key]
    return out


def _old_load(model, sd):
    """The whole-dict loader this package replaced (the oracle): a dice_ds-layout ``sd`` is renamed
    to released keys first (a shard's own state dict holds its experts in local order)."""
    local = local_expert_ids(model)
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if is_dice_layout(sd):
        held = (sd["blocks.0.moe.experts.fc1_weight"].shape[0]
                if "blocks.0.moe.experts.fc1_weight" in sd else
                len({k.split(".")[5] for k in sd if ".local_experts." in k and k.startswith("blocks.0.")}))
        shard = len(local) < model.cfg.num_experts and held == len(local)
        sd = mcore_to_released(sd, expert_ids=local if shard else None)
    missing, unexpected = model.load_state_dict(_expected(model, sd), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)


def _same_bytes(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if torch.is_tensor(sa[k]):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(-1).view(torch.uint8),
                                                              sb[k].view(-1).view(torch.uint8)), k


def _write(sd, path, form):
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif form == "legacy":
        torch.save({"ema": sd}, path, _use_new_zipfile_serialization=False)
    elif form == "training":  # the EMA weights next to the trained ones, of the same layout
        torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {}}, path)
    else:
        torch.save({"raw": sd, "ema": {"ema": sd}, "model": {"model": sd, "opt": {}}}[form], path)
    return path


FORMS = ("raw", "ema", "model", "training", "legacy", "safetensors")


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
@pytest.mark.parametrize("form", FORMS)
def test_released_files_load_bitwise_like_before(tmp_path, flavor, form):
    cfg = FLAVORS[flavor]
    src = _model(cfg, "grouped", torch.float32, seed=3)
    released = export_released_state_dict(src)
    path = _write(released, tmp_path / ("ckpt.safetensors" if form == "safetensors" else "ckpt.pt"),
                  form)
    e = cfg.num_experts
    for impl in ("grouped", "sequential"):
        for dtype in (torch.float32, torch.bfloat16):
            for ids in (None, list(range(e // 2, e))):  # whole model, the second EP rank's shard
                new, old = _model(cfg, impl, dtype, ids), _model(cfg, impl, dtype, ids)
                with open_checkpoint(path) as reader:
                    assert reader.kind == {"legacy": "memory", "safetensors": "safetensors"
                                           }.get(form, "torch-zip")
                    result = load_into_model(new, reader)
                _old_load(old, released)
                _same_bytes(new, old)
                shard = ids is not None
                assert result.dropped_expert_keys == (cfg.depth * 3 * e // 2 if shard else 0)


@pytest.mark.parametrize("layout", ["grouped", "sequential"])
@pytest.mark.parametrize("into", ["grouped", "sequential"])
def test_dice_layout_files_load_bitwise_like_before(tmp_path, layout, into):
    cfg = FLAVORS["digits-e8-flash"]
    whole = _model(cfg, layout, torch.float32, seed=5)
    shard_src = _model(cfg, layout, torch.float32, ids=[4, 5, 6, 7], seed=6)
    for name, sd, ids in (("whole", whole.state_dict(), None),
                          ("whole-into-shard", whole.state_dict(), [4, 5, 6, 7]),
                          ("shard", shard_src.state_dict(), [4, 5, 6, 7])):
        tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
        for form in ("ema", "safetensors"):
            path = _write(tensors, tmp_path / f"{name}.{'safetensors' if form == 'safetensors' else 'pt'}",
                          form)
            new, old = _model(cfg, into, torch.float32, ids), _model(cfg, into, torch.float32, ids)
            with open_checkpoint(path) as reader:
                load_into_model(new, reader)
            _old_load(old, tensors)
            _same_bytes(new, old)


def test_a_shard_reads_only_its_experts(tmp_path):
    cfg = FLAVORS["debug-e8-timm"]
    path = _write(export_released_state_dict(_model(cfg, "grouped", torch.float32, seed=1)),
                  tmp_path / "c.safetensors", "safetensors")
    with open_checkpoint(path) as reader:
        total = sum(i.numel * i.dtype.itemsize for i in reader.infos.values())
        expert = sum(i.numel * i.dtype.itemsize for k, i in reader.infos.items()
                     if ".moe.experts." in k)
        full = load_into_model(_model(cfg, "grouped", torch.bfloat16), reader).bytes_read
        shard_model = _model(cfg, "grouped", torch.bfloat16, ids=[2, 3])
        shard = load_into_model(shard_model, reader).bytes_read
        floor = time_plain_read(shard_model, reader)
    assert full == total
    assert shard == total - expert * 6 // 8  # 2 of 8 experts per layer
    assert floor["bytes"] == shard


def test_meta_state_dict_allocates_nothing(tmp_path):
    cfg = FLAVORS["debug-e4-timm"]
    released = export_released_state_dict(_model(cfg, "grouped", torch.float32, seed=1))
    path = _write(released, tmp_path / "c.pt", "ema")
    with open_checkpoint(path) as reader:
        metas = reader.meta_state_dict()
    assert metas.keys() == released.keys()
    assert all(m.is_meta and m.shape == released[k].shape and m.dtype == released[k].dtype
               for k, m in metas.items())


def test_model_is_built_on_meta_then_materialised_once():
    import dice_ds.models.dit_moe as dm

    cfg = FLAVORS["digits-e8-flash"]
    m = build_model(cfg, params_dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters())
    table = dm.sincos_pos_embed_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size)
    assert torch.equal(m.pos_embed[0], table.to(torch.bfloat16))


def test_cast_regions_are_read_in_chunks_and_stay_bitwise(tmp_path, monkeypatch):
    import dice_ds.weights.load as load

    monkeypatch.setattr(load, "CHUNK_BYTES", 1000)  # every cast region in many odd-sized pieces
    cfg = FLAVORS["digits-e8-flash"]
    released = export_released_state_dict(_model(cfg, "grouped", torch.float32, seed=9))
    path = _write(released, tmp_path / "c.safetensors", "safetensors")
    for impl in ("grouped", "sequential"):
        new = _model(cfg, impl, torch.bfloat16, ids=[4, 5, 6, 7])
        old = _model(cfg, impl, torch.bfloat16, ids=[4, 5, 6, 7])
        with open_checkpoint(path) as reader:
            load_into_model(new, reader)
        _old_load(old, released)
        _same_bytes(new, old)
