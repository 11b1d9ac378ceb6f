"""Per-rank expert loading: at EP=2 each rank loads only its E/2 experts from a released checkpoint.

The test process writes a released-format checkpoint (``{"ema": sd}``, keys
``blocks.b.moe.experts.e.{gate,up,down}_proj.weight``) from a full single-process model; two gloo
ranks stream it into an EP=2 model with ``dice_ds.weights.load.load_into_model``. Each rank
must hold exactly E/2 experts per layer (megatron's contiguous placement: EP rank r holds
[r·E/2, (r+1)·E/2)), equal to the checkpoint's tensors, hold fewer parameter bytes than the full
model by exactly E/2 experts' worth, and its sync-EP forward must equal the full model loaded from
the same file.
"""
import pytest
import torch

from distributed import run_ranks


def _load_on_rank(rank, world, path, impl):
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.models.experts import expert_weight_views, is_routed_expert_param
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups, local_model_groups
    from dice_ds.weights.load import load_into_model
    from dice_ds.weights.read import open_checkpoint, read_state_dict

    cfg = get_flavor("debug").replace(experts_impl=impl)
    sd = read_state_dict(path)  # the values to compare with
    model = init_weights(build_model(cfg, build_groups(ParallelDims(world, world))), "random", seed=99)
    full = build_model(cfg, local_model_groups())
    with open_checkpoint(path) as reader:  # as a run loads: this rank's tensors only
        result = load_into_model(model, reader)
        load_into_model(full, reader)
    per_expert_equal = []
    for b, moe in enumerate(model.moe_layers()):
        for i, (w1, w2) in enumerate(expert_weight_views(moe.experts)):
            e = moe.local_expert_indices[i]
            pre = f"blocks.{b}.moe.experts.{e}."
            fc1 = torch.cat([sd[pre + "gate_proj.weight"], sd[pre + "up_proj.weight"]])
            per_expert_equal.append(torch.equal(w1, fc1)
                                    and torch.equal(w2, sd[pre + "down_proj.weight"]))
    g = torch.Generator().manual_seed(rank)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    y = torch.randint(0, 1000, (2,), generator=g)
    with torch.no_grad():
        forward_equal = torch.equal(model(x, t, y), full(x, t, y))
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    expert_numel = sum(p.numel() for k, p in model.named_parameters() if is_routed_expert_param(k))
    return {"local_experts": [list(m.local_expert_indices) for m in model.moe_layers()],
            "num_local": [len(expert_weight_views(m.experts)) for m in model.moe_layers()],
            "expert_numel": expert_numel,
            "dropped": result.dropped_expert_keys,
            "per_expert_equal": per_expert_equal, "forward_equal": forward_equal,
            "bytes": nbytes(model), "full_bytes": nbytes(full),
            "expert_bytes": sum(p.numel() * p.element_size()
                                for m in full.moe_layers() for p in expert_weight_views(m.experts)[0])}


@pytest.mark.parametrize("impl", ["sequential", "grouped"])  # ModelConfig.experts_impl
def test_ep2_ranks_load_only_their_experts(tmp_path, impl):
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.weights.save import save_checkpoint

    cfg = get_flavor("debug")
    path = save_checkpoint(init_weights(build_model(cfg), "random", seed=5), tmp_path / "ckpt.pt")
    results = run_ranks(_load_on_rank, 2, tmp_path, str(path), impl)
    half = cfg.num_experts // 2
    for rank, r in enumerate(results):
        assert r["local_experts"] == [list(range(rank * half, (rank + 1) * half))] * cfg.depth
        assert r["num_local"] == [half] * cfg.depth
        per_expert = 3 * cfg.expert_ffn_size * cfg.hidden_size  # fc1 (gate, up) + fc2
        assert r["expert_numel"] == half * cfg.depth * per_expert
        assert r["dropped"] == half * cfg.depth * 3      # gate/up/down of the other rank's experts
        assert len(r["per_expert_equal"]) == half * cfg.depth and all(r["per_expert_equal"])
        assert r["forward_equal"]
        # expert_bytes = one expert of every layer; the other rank's half is absent
        assert r["full_bytes"] - r["bytes"] == half * r["expert_bytes"]
