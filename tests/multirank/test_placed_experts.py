"""Expert placement changes where an expert runs, never what it computes (dice_ds/placement.py).

On real gloo groups of 2 and 4 ranks, the debug model (E = 4, 2 MoE layers) samples the same
batch with megatron's contiguous placement and with other placements: a permutation (a different
one per layer, slots in no particular order), and replicas (every rank holds one extra slot: a
copy of another rank's expert, the hot ones twice where the ranks allow), in every EP mode (sync,
displaced, interweaved, DICE with conditional communication, interweaved with current router
weights). Every placed run equals the contiguous run of its mode up to float rounding, and the
replicas do compute rows (the slot row counters say so). The weights come from ``init_weights``
(per logical expert), so a slot holding the wrong expert, a token sent to a slot of another
expert, or a replica's rows lost or counted twice would change the images.
"""
import pytest
import torch
from distributed import run_ranks
from test_ep_modes import MODES, WEIGHT_STD, _batch, euler_sample

PLACED_MODES = ("sync", "displaced", "interweaved", "dice", "interweaved_current")
PLACEMENTS = {
    2: {"permuted": [[[3, 1], [0, 2]], [[2, 0], [1, 3]]],
        "replicas": [[[0, 1, 3], [2, 3, 1]], [[3, 2, 0], [1, 0, 2]]]},
    4: {"permuted": [[[3], [1], [0], [2]], [[2], [0], [3], [1]]],
        "replicas": [[[0, 1], [2, 0], [3, 0], [1, 2]], [[3, 1], [2, 3], [0, 3], [1, 2]]]},
}
REL_TOL = 1e-5


def _placed_ranks(rank, world):
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.apply import parallelize_dit_moe
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups
    from dice_ds.parallel.plan import ParallelPlan
    from dice_ds.placement import Placement

    cfg = get_flavor("debug")
    z0, y = _batch(cfg, rank)
    groups = build_groups(ParallelDims(world, world))
    out = {}
    for name, layers in {"contiguous": None, **PLACEMENTS[world]}.items():
        placement = None if layers is None else Placement(
            cfg.num_experts, world, tuple(tuple(tuple(r) for r in lay) for lay in layers))
        model = init_weights(build_model(cfg, groups, placement=placement), "random", seed=21,
                             std=WEIGHT_STD)
        for mode in PLACED_MODES:
            rt = parallelize_dit_moe(model, ParallelPlan(ep_size=world, **MODES[mode]), groups)
            out[name, mode] = euler_sample(model, rt, z0, y)[0].numpy()
            rt.detach()
        out[name, "slot_rows"] = [layer.slot_rows_P.tolist() for layer in model.moe_layers()]
        out[name, "local"] = [layer.local_logical_experts for layer in model.moe_layers()]
    return out


@pytest.fixture(scope="module", params=[2, 4])
def placed(request, tmp_path_factory):
    world = request.param
    return world, run_ranks(_placed_ranks, world, tmp_path_factory.mktemp(f"placed{world}"),
                            timeout=600)


@pytest.mark.parametrize("mode", PLACED_MODES)
@pytest.mark.parametrize("placement", ["permuted", "replicas"])
def test_placed_run_equals_the_contiguous_run(placed, placement, mode):
    world, per_rank = placed
    for rank, res in enumerate(per_rank):
        want = torch.from_numpy(res["contiguous", mode])
        got = torch.from_numpy(res[placement, mode])
        assert torch.isfinite(got).all()
        err = ((got - want).norm() / want.norm()).item()
        assert err <= REL_TOL, f"{world} ranks, rank {rank}, {placement}, {mode}: rel. error {err}"


def test_each_rank_holds_and_computes_its_slots(placed):
    world, per_rank = placed
    for name, layers in PLACEMENTS[world].items():
        for rank, res in enumerate(per_rank):
            assert [list(x) for x in res[name, "local"]] == [lay[rank] for lay in layers]
        # rows sent to each physical slot, summed over ranks: every slot of a replicated
        # expert computes some, and the rows are those of the contiguous run, redistributed
        sent = torch.tensor([res[name, "slot_rows"] for res in per_rank]).sum(0)
        base = torch.tensor([res["contiguous", "slot_rows"] for res in per_rank]).sum(0)
        for l, lay in enumerate(layers):
            slots = [e for r in lay for e in r]
            per_expert = torch.zeros(len(base[l]), dtype=torch.long)
            per_expert.index_add_(0, torch.tensor(slots), sent[l])
            assert per_expert.tolist() == base[l].tolist(), (name, l)
            if name == "replicas":
                assert (sent[l] > 0).all(), (l, sent[l].tolist())


def _pipeline_ranks(rank, world, placement_file):
    """The pipeline from settings: contiguous, balanced at start-up (with replicas) and a placement
    file, in sync EP and DICE."""
    from golden_modes import DEBUG, LABELS, SEED, _pipeline

    from dice_ds.modes import by_key

    out = {}
    for key in ("sync", "dice"):
        for name, extra in (("contiguous", {}),
                            ("balanced", {"expert_placement": "balanced", "expert_replicas": 1}),
                            ("file", {"expert_placement": placement_file})):
            pipe = _pipeline((DEBUG, {**by_key(key).settings, **extra}))
            got = pipe(class_labels=LABELS["debug"], seed=SEED, output_type="latent")
            out[name, key] = got.images.numpy() if rank == 0 else None
            out[name, key, "placement"] = pipe.spec.placement
            out[name, key, "local"] = [m.local_logical_experts for m in pipe.model.moe_layers()]
            pipe.runtime.detach()
    return out


def test_pipeline_places_experts_from_its_settings(tmp_path):
    from dice_ds.placement import Placement

    path = tmp_path / "placement.json"
    Placement(4, 2, tuple(tuple(tuple(r) for r in lay) for lay in PLACEMENTS[2]["replicas"]),
              source="test").write(str(path))
    per_rank = run_ranks(_pipeline_ranks, 2, tmp_path, str(path), timeout=600)
    for key in ("sync", "dice"):
        want = torch.from_numpy(per_rank[0]["contiguous", key])
        for name in ("balanced", "file"):
            got = torch.from_numpy(per_rank[0][name, key])
            err = ((got - want).norm() / want.norm()).item()
            assert err <= REL_TOL, (name, key, err)
        assert per_rank[0]["contiguous", key, "placement"] is None
        computed = per_rank[0]["balanced", key, "placement"]
        # every rank computed the same placement, with one extra slot per rank, and holds its slots
        assert computed.replicas == 1 and all(r["balanced", key, "placement"] == computed
                                              for r in per_rank)
        for rank, res in enumerate(per_rank):
            assert res["balanced", key, "local"] == [lay[rank] for lay in computed.layers]
            assert [list(x) for x in res["file", key, "local"]] == \
                [lay[rank] for lay in PLACEMENTS[2]["replicas"]]
