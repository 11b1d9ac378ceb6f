"""Grouped experts (``dice_ds/mcore/experts.py``) against megatron's ``SequentialMLP``.

Both implementations are built by ``build_model`` from the same ``ModelConfig`` except
``experts_impl`` and initialised from the same seed, so their experts hold the same values; the
experts module is then called the way megatron's ``MoELayer`` and ``dice_ds/moe/runtime.py`` call it
(rows sorted by local expert, counts, router probs), including experts that receive no rows.
"""
import pytest
import torch

from dice_ds.config import ConfigError, get_flavor
from dice_ds.models import build_model, init_weights
from dice_ds.models.experts import expert_weight_views
from dice_ds.weights.keymap import mcore_to_released
from dice_ds.weights.load import CheckpointMismatchError, load_into_model
from dice_ds.weights.read import read_state_dict
from dice_ds.weights.save import export_released_state_dict, save_checkpoint

DEBUG = get_flavor("debug").replace(experts_impl="sequential")  # _pair adds the grouped twin
S2_WIDTH = DEBUG.replace(depth=1, hidden_size=384, num_heads=6, num_experts=8)
ATOL = 1e-6  # fp32; the measured difference is 0 (the same GEMMs per expert)


def _pair(cfg, seed=3):
    seq = init_weights(build_model(cfg), "random", seed=seed)
    grp = init_weights(build_model(cfg.replace(experts_impl="grouped")), "random", seed=seed)
    assert type(seq.blocks[0].moe.experts).__name__ == "SequentialMLP"
    assert type(grp.blocks[0].moe.experts).__name__ == "GroupedExperts"
    return seq, grp


def _call(experts, counts, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    d = expert_weight_views(experts)[0][0].shape[1]
    rows = int(sum(counts))
    x = torch.randn(rows, d, generator=gen).to(dtype)
    probs = torch.rand(rows, generator=gen)  # megatron's router probs stay fp32
    out, bias = experts(x, torch.tensor(counts), probs)
    assert bias is None and out.shape == (rows, d) and out.dtype == dtype
    return out


@pytest.mark.parametrize("cfg", [DEBUG, S2_WIDTH], ids=["debug", "S2-width"])
def test_grouped_equals_sequential_on_random_routing(cfg):
    seq, grp = _pair(cfg)
    a, b = seq.blocks[0].moe.experts, grp.blocks[0].moe.experts
    gen = torch.Generator().manual_seed(1)
    e = cfg.num_experts
    cases = [torch.randint(0, 40, (e,), generator=gen).tolist() for _ in range(3)]
    cases += [[0] * e, [0] * (e - 1) + [7], [9] + [0] * (e - 1), [0, 5] * (e // 2), [1] * e]
    with torch.no_grad():
        for i, counts in enumerate(cases):
            ref, out = _call(a, counts, seed=i), _call(b, counts, seed=i)
            if out.numel():
                assert (out - ref).abs().max().item() <= ATOL, counts


def test_zero_rows_with_any_strides():
    """An empty [0, D] tensor counts as contiguous whatever its strides (one received from an
    all-to-all had strides torch._grouped_mm rejects: a 4-rank EP test caught it)."""
    _, grp = _pair(DEBUG)
    ex = grp.blocks[0].moe.experts
    x = torch.randn(64, 0).t()  # [0, 64], strides (1, 64)
    assert x.is_contiguous()
    with torch.no_grad():
        out, bias = ex(x, torch.zeros(DEBUG.num_experts, dtype=torch.long), torch.zeros(0))
    assert out.shape == (0, 64) and bias is None
    one = torch.randn(1, 3 * 64 + 1)[:, :64]  # one row, "contiguous", row stride 193 (not 16-byte)
    assert one.is_contiguous()
    counts = torch.tensor([0, 1, 0, 0])
    with torch.no_grad():
        ref = ex(one.clone(), counts, torch.ones(1))[0]
        assert torch.equal(ex(one, counts, torch.ones(1))[0], ref)


def test_grouped_weights_equal_sequential_after_init():
    seq, grp = _pair(DEBUG, seed=11)
    for la, lb in zip(seq.moe_layers(), grp.moe_layers()):
        for wa, wb in zip(expert_weight_views(la.experts), expert_weight_views(lb.experts)):
            assert all(torch.equal(p, q) for p, q in zip(wa, wb))


def test_grouped_bf16_close_to_sequential():
    seq, grp = _pair(DEBUG)
    a = seq.blocks[0].moe.experts.to(torch.bfloat16)
    b = grp.blocks[0].moe.experts.to(torch.bfloat16)
    with torch.no_grad():
        ref, out = _call(a, [10, 0, 3, 20], dtype=torch.bfloat16), _call(b, [10, 0, 3, 20],
                                                                         dtype=torch.bfloat16)
    assert (out.float() - ref.float()).abs().max().item() <= 2e-2 * ref.float().abs().max().item()


def test_grouped_backward_matches_sequential():
    """Training (scripts/train_digits.py) backpropagates through the experts; .sum() gives a
    stride-0 gradient, which torch._grouped_mm's own backward rejects."""
    seq, grp = _pair(DEBUG)
    a, b = seq.blocks[0].moe.experts, grp.blocks[0].moe.experts
    counts = [6, 0, 4, 9]
    _call(a, counts).sum().backward()
    _call(b, counts).sum().backward()
    for (fa, ga), (fb, gb) in zip([(e.linear_fc1.weight.grad, e.linear_fc2.weight.grad)
                                   for e in a.local_experts],
                                  zip(b.fc1_weight.grad, b.fc2_weight.grad)):
        assert (fa - fb).abs().max() <= 1e-5 and (ga - gb).abs().max() <= 1e-5


def test_full_model_grouped_equals_sequential():
    seq, grp = _pair(DEBUG.replace(num_experts=8, depth=3))
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([3, 1, 2, 1000])
    with torch.no_grad():
        assert (seq(x, t, y) - grp(x, t, y)).abs().max().item() <= ATOL


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoints_cross_load_between_implementations(tmp_path):
    seq, grp = _pair(DEBUG, seed=5)
    released = export_released_state_dict(seq)
    exported = export_released_state_dict(grp)
    assert released.keys() == exported.keys()
    assert all(torch.equal(released[k], exported[k]) for k in released)
    path = save_checkpoint(grp, tmp_path / "grouped.safetensors")  # no shared storage in the export
    assert all(torch.equal(read_state_dict(path)[k], released[k]) for k in released)
    for impl, sd in [("grouped", seq.state_dict()), ("sequential", grp.state_dict()),
                     ("grouped", grp.state_dict()), ("grouped", released)]:
        other = build_model(DEBUG.replace(experts_impl=impl))
        load_into_model(other, sd)
        assert all(torch.equal(released[k], v) for k, v in export_released_state_dict(other).items())


def _shard(model, ids):
    """Narrow every grouped MoE layer to experts ``ids`` the way an EP rank holds them."""
    for moe in model.moe_layers():
        ex = moe.experts
        ex.fc1_weight = torch.nn.Parameter(ex.fc1_weight.data[: len(ids)].clone())
        ex.fc2_weight = torch.nn.Parameter(ex.fc2_weight.data[: len(ids)].clone())
        ex.num_local_experts = len(ids)
        moe.local_expert_indices = list(ids)
    return model


def test_grouped_ep_shard_loads_only_its_experts():
    seq, _ = _pair(DEBUG, seed=6)
    released = export_released_state_dict(seq)
    model = _shard(build_model(DEBUG.replace(experts_impl="grouped")), [2, 3])
    result = load_into_model(model, released)
    assert result.local_experts == (2, 3) and result.dropped_expert_keys == 2 * 3 * 2
    for b in range(DEBUG.depth):
        ex = model.blocks[b].moe.experts
        for i, e in enumerate((2, 3)):
            assert torch.equal(ex.fc2_weight[i], released[f"blocks.{b}.moe.experts.{e}.down_proj.weight"])
            gate = released[f"blocks.{b}.moe.experts.{e}.gate_proj.weight"]
            assert torch.equal(ex.fc1_weight[i][: gate.shape[0]], gate)
    other = _shard(build_model(DEBUG.replace(experts_impl="grouped")), [2, 3])
    load_into_model(other, model.state_dict())  # a shard's own state dict loads into a like shard
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_keymap_grouped_layout():
    seq, _ = _pair(DEBUG, seed=7)
    released = export_released_state_dict(seq)
    model = _shard(build_model(DEBUG.replace(experts_impl="grouped")), [3, 1])
    load_into_model(model, released)
    fc2 = model.blocks[0].moe.experts.fc2_weight
    assert fc2.shape == (2, 64, 256)
    assert torch.equal(fc2[0], released["blocks.0.moe.experts.3.down_proj.weight"])
    back = mcore_to_released(model.state_dict(), expert_ids=[3, 1])
    assert {k for k in back if ".moe.experts." in k} == {
        f"blocks.{b}.moe.experts.{e}.{p}.weight" for b in range(DEBUG.depth) for e in (3, 1)
        for p in ("gate_proj", "up_proj", "down_proj")}
    assert all(torch.equal(back[k], released[k]) for k in back)
    for part in ("gate_proj", "up_proj", "down_proj"):  # expert 1 of block 1 absent altogether
        del released[f"blocks.1.moe.experts.1.{part}.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"3 missing: blocks.1.moe.experts.1.down_proj"):
        load_into_model(_shard(build_model(DEBUG.replace(experts_impl="grouped")), [0, 1]), released)


def test_experts_impl_is_validated():
    with pytest.raises(ConfigError, match="experts_impl='loop'"):
        DEBUG.replace(experts_impl="loop").validate()


def test_a_rows_output_does_not_depend_on_how_many_rows_its_expert_got():
    """Batch invariance on CPU (``MIN_CPU_GROUP_ROWS``): a token's output is the same bit for bit
    whether its expert got 1-15 rows or 40. Without the padding this fails on AVX-512 machines
    (MKL rounds GEMMs of few rows differently), which broke EP == DP in the multirank tests."""
    _, grp = _pair(S2_WIDTH)
    ex = grp.blocks[0].moe.experts
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(48, 384, generator=gen)
    probs = torch.rand(48, generator=gen)
    counts_big = [40, 8] + [0] * 6
    with torch.no_grad():
        big, _ = ex(x, torch.tensor(counts_big), probs)
        for m in (1, 2, 3, 7, 15, 16):
            small, _ = ex(torch.cat([x[:m], x[40:]]), torch.tensor([m, 8] + [0] * 6),
                          torch.cat([probs[:m], probs[40:]]))
            assert torch.equal(small[:m], big[:m]), m
            assert torch.equal(small[m:], big[40:]), m
