"""Synchronous expert parallelism equals the single-process model (spec §2.2.1).

Every rank builds the debug DiT-MoE twice from the same seed: an EP model on ``build_groups``
(holding E/ep experts per layer) and a reference on this rank alone (all E experts). Each rank feeds
DIFFERENT inputs; the reference computes that rank's inputs alone. fp32 outputs must be bitwise equal
(``torch.equal``; megatron's dropless all-to-all EP runs the same per-token arithmetic as EP=1).

Cases: world 2 / EP 2 and world 4 / EP 4 (EP = world), world 4 / EP 2 (EP inside DP: ep [0,1] [2,3]),
each for ``forward`` and ``forward_with_cfg``; plus a degenerate routing where every token of layer 0
goes to experts {0, 1} and every token of layer 1 to {2, 3}, so whole EP ranks receive zero tokens
(spec pitfall 16), checked on the routing map itself.
"""
import torch

from distributed import run_ranks

SEED = 11


def _force_routing(model, layer: int, experts: tuple[int, ...]) -> None:
    """Make every token of MoE layer ``layer`` route to ``experts`` (top-2), for any input.

    The MLP modulation becomes u = 0.1·LN(x) + 3 (> 0 everywhere: |LN(x)| <= sqrt(D - 1) < 30),
    and router rows are positive for ``experts`` and negative otherwise, so their logits win.
    """
    block = model.blocks[layer]
    d = model.cfg.hidden_size
    lin = block.adaLN_modulation[1]
    gen = torch.Generator().manual_seed(100 + layer)
    with torch.no_grad():
        lin.weight[3 * d:5 * d].zero_()
        lin.bias[3 * d:4 * d].fill_(3.0)   # shift_mlp
        lin.bias[4 * d:5 * d].fill_(-0.9)  # scale_mlp: 1 + scale = 0.1
        w = block.moe.router.weight
        mag = torch.rand(w.shape, generator=gen) * 0.5 + 0.1
        sign = torch.tensor([1.0 if e in experts else -1.0 for e in range(w.shape[0])])
        w.copy_(mag * sign.unsqueeze(1))


def _record_routing(model) -> list:
    """Forward hooks storing each router's routing map (megatron's router returns probs, map)."""
    maps = []
    for moe in model.moe_layers():
        moe.router.register_forward_hook(lambda mod, inp, out: maps.append(out[1].clone()))
    return maps


def _inputs(cfg, rank: int, n: int = 3):
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, t, y


def _compare(model, ref, cfg, rank) -> dict:
    x, t, y = _inputs(cfg, rank)
    with torch.no_grad():
        out, ref_out = model(x, t, y), ref(x, t, y)
        cfg_out, ref_cfg = model.forward_with_cfg(x, t, y, 1.5), ref.forward_with_cfg(x, t, y, 1.5)
    return {"forward_equal": torch.equal(out, ref_out),
            "forward_maxdiff": (out - ref_out).abs().max().item(),
            "cfg_equal": torch.equal(cfg_out, ref_cfg),
            "cfg_maxdiff": (cfg_out - ref_cfg).abs().max().item(),
            "nontrivial": out.abs().mean().item() > 1e-3 and out.shape == ref_out.shape}


def _ep_vs_reference(rank, world, ep_sizes):
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups, local_model_groups

    cfg = get_flavor("debug")
    ref = init_weights(build_model(cfg, local_model_groups()), "random", seed=SEED)
    results = {}
    for ep_size in ep_sizes:
        groups = build_groups(ParallelDims(world, ep_size))
        model = init_weights(build_model(cfg, groups), "random", seed=SEED)
        experts = [list(m.local_expert_indices) for m in model.moe_layers()]
        results[ep_size] = _compare(model, ref, cfg, rank)
        results[ep_size]["local_experts"] = experts
        for m in (model, ref):
            _force_routing(m, 0, (0, 1))
            _force_routing(m, 1, (2, 3))
        maps = _record_routing(model)
        results[ep_size]["degenerate"] = _compare(model, ref, cfg, rank)
        results[ep_size]["routed_experts"] = [m.any(0).nonzero().flatten().tolist() for m in maps[:2]]
        ref = init_weights(ref, "random", seed=SEED)  # undo the forced routing for the next EP size
    return results


def _check(results, ep_size, num_experts=4):
    per_rank = num_experts // ep_size
    for rank, res in enumerate(results):
        r = res[ep_size]
        ep_rank = rank % ep_size
        assert r["local_experts"] == [list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))] * 2
        for case in (r, r["degenerate"]):
            assert case["nontrivial"]
            assert case["forward_equal"], (rank, ep_size, case["forward_maxdiff"])
            assert case["cfg_equal"], (rank, ep_size, case["cfg_maxdiff"])
        assert r["routed_experts"] == [[0, 1], [2, 3]]


def test_sync_ep2_world2_equals_single_process(tmp_path):
    results = run_ranks(_ep_vs_reference, 2, tmp_path, (2,))
    _check(results, 2)


def test_sync_ep4_and_ep2_inside_dp_world4(tmp_path):
    results = run_ranks(_ep_vs_reference, 4, tmp_path, (4, 2))
    _check(results, 4)
    _check(results, 2)
