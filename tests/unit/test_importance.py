"""Tables for dice_ds.moe.importance: slot order from sorted top-k, ties, skip masks, top-2 only."""
import pytest
import torch

from dice_ds.moe.importance import skip_map, slot_experts


def _route(probs_TE, k=2):
    """Routing map of the k best experts (what megatron's TopKRouter produces for softmax top-k)."""
    ids = torch.topk(probs_TE, k, dim=1).indices
    return torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, ids, True)


PROBS = torch.tensor([[0.10, 0.50, 0.30, 0.10],
                      [0.40, 0.05, 0.05, 0.50],
                      [0.20, 0.20, 0.35, 0.25],
                      [0.05, 0.15, 0.60, 0.20]])


def test_slot_experts_table():
    hi, lo = slot_experts(PROBS, _route(PROBS))
    assert hi.tolist() == [1, 3, 2, 2]
    assert lo.tolist() == [2, 0, 3, 3]


def test_slot_experts_reads_only_routed_entries():
    # an unrouted expert with a larger score must not be taken (the map, not the probs, decides)
    probs = torch.tensor([[0.9, 0.2, 0.3, 0.0]])
    rmap = torch.tensor([[False, True, True, False]])
    hi, lo = slot_experts(probs, rmap)
    assert (hi.item(), lo.item()) == (2, 1)


def test_slot_experts_ties_break_to_lower_expert_id():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.3], [0.3, 0.0, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    rmap = torch.tensor([[False, True, False, True], [True, False, True, False],
                         [False, False, True, True]])
    hi, lo = slot_experts(probs, rmap)
    assert hi.tolist() == [1, 0, 2] and lo.tolist() == [3, 2, 3]


def test_skip_map_low_high():
    rmap = _route(PROBS)
    low, high = skip_map(PROBS, rmap, "low"), skip_map(PROBS, rmap, "high")
    assert low.nonzero().tolist() == [[0, 2], [1, 0], [2, 3], [3, 3]]
    assert high.nonzero().tolist() == [[0, 1], [1, 3], [2, 2], [3, 2]]
    assert torch.equal(low | high, rmap) and not (low & high).any()


def test_skip_map_rand_is_reproducible_and_one_slot_per_token():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(512, 8, generator=g), dim=1)
    rmap = _route(probs)
    a = skip_map(probs, rmap, "rand", torch.Generator().manual_seed(7))
    b = skip_map(probs, rmap, "rand", torch.Generator().manual_seed(7))
    c = skip_map(probs, rmap, "rand", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(1) == 1).all() and not (a & ~rmap).any()
    took_high = (a & skip_map(probs, rmap, "high")).any(1).float().mean().item()
    assert 0.4 < took_high < 0.6  # both slots are drawn
    gen = torch.Generator().manual_seed(7)  # one generator advances: consecutive masks differ
    assert not torch.equal(skip_map(probs, rmap, "rand", gen), skip_map(probs, rmap, "rand", gen))


def test_skip_map_empty_and_errors():
    empty = torch.zeros(0, 4)
    assert skip_map(empty, empty.bool(), "low").shape == (0, 4)
    rmap = _route(PROBS)
    with pytest.raises(ValueError, match="top-2"):
        skip_map(PROBS, _route(PROBS, k=1), "low")
    with pytest.raises(ValueError, match="top-2"):
        slot_experts(PROBS, _route(PROBS, k=3))
    with pytest.raises(ValueError, match="Generator"):
        skip_map(PROBS, rmap, "rand")
    with pytest.raises(ValueError, match="strategy"):
        skip_map(PROBS, rmap, "median")
    with pytest.raises(ValueError, match="bool"):
        slot_experts(PROBS, rmap.int())
    with pytest.raises(ValueError, match=">= 2 experts"):
        slot_experts(torch.ones(3, 1), torch.ones(3, 1, dtype=torch.bool))
