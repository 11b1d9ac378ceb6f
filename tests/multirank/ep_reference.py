"""Per-step references for the DICE EP tests (helpers, not a test module).

Layer-level harness: every rank drives the MoE layers of an EP-sharded debug model directly, layer
l at step i getting its own input h[i, l] (seeded by rank, step, layer: routing changes every step).
A single-process reference model with the same weights gives, per (step, layer): the shared expert
output, each token's two slot experts (slot 0 = higher router score), their router probs and their
UNWEIGHTED outputs. Every expected layer output is assembled from these parts, so a test can name
the step each slot's expert output came from.

Shape legend: T tokens of one layer call on this rank, D hidden, E experts, 2 slots.
"""
import torch

MATCH_ATOL = 1e-5


def layer_inputs(cfg, depth: int, num_steps: int, rank: int, n_img: int = 2) -> dict:
    d, t = cfg.hidden_size, cfg.num_tokens
    h = {}
    for i in range(1, num_steps + 1):
        for l in range(depth):
            g = torch.Generator().manual_seed(rank * 10_007 + i * 101 + l)
            h[i, l] = torch.randn(n_img, t, d, generator=g)
    return h


@torch.no_grad()
def reference_parts(ref, h: dict) -> dict:
    """(shared_TD, slot probs_T2, unweighted slot outputs_T2D, routing map_TE) per (step, layer)."""
    from dice_ds.moe.importance import slot_experts

    parts = {}
    for (i, l), x in h.items():
        layer = ref.blocks[l].moe
        h_S1D = x.reshape(-1, 1, x.shape[-1])
        probs, rmap = layer.route(h_S1D)
        hi, lo = slot_experts(probs, rmap)
        ids = torch.stack([hi, lo], 1)
        flat = h_S1D.view(-1, x.shape[-1])
        ones = torch.ones(flat.shape[0])
        # every local expert on every token, through the experts module's own interface (either
        # ModelConfig.experts_impl): rows sorted by expert, T per expert, probs 1
        n_local, tok = len(layer.local_expert_indices), flat.shape[0]
        out, _ = layer.experts(flat.repeat(n_local, 1), torch.full((n_local,), tok),
                               ones.repeat(n_local))
        f_TED = out.view(n_local, tok, -1).transpose(0, 1)
        t = torch.arange(flat.shape[0]).unsqueeze(1)
        parts[i, l] = (layer.shared_experts(h_S1D).view_as(flat), probs.gather(1, ids),
                       f_TED[t, ids], rmap)
    return parts


def expected_source(plan_kw: dict, num_steps: int, depth: int, i: int, layer: int) -> int:
    """The step whose tokens produced layer ``layer``'s routed output at step ``i`` (spec §2.2)."""
    from dice_ds.schedule import async_layer_indices, sync_steps

    sync = sync_steps(num_steps, plan_kw.get("warmup", 0), plan_kw.get("cooldown", 0),
                      plan_kw.get("strided", 0))
    mode = plan_kw.get("mode", "sync")
    if mode == "sync" or i in sync or layer not in async_layer_indices(plan_kw["async_layers"],
                                                                        depth):
        return i
    if mode == "interweaved":
        return i + 1
    return i + 1 if i + 1 in sync else i + 2


def build_pair(cfg, ep_size: int, seed: int = 5):
    """(EP model, its groups, single-process reference) with identical weights."""
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups, local_model_groups

    ref = init_weights(build_model(cfg, local_model_groups()), "random", seed=seed)
    groups = build_groups(ParallelDims(torch.distributed.get_world_size(), ep_size))
    model = init_weights(build_model(cfg, groups), "random", seed=seed)
    return model, groups, ref
