"""The rank layout changes which ranks form each group, never an image (4 ranks):

- the EP x SP mesh modes (sync EP x sync SP, DICE x displaced SP) under ``--rank-layout
  sp-inner`` (SP groups [0,1] [2,3], EP [0,2] [1,3]) equal the golden fixtures, written with
  today's ``ep-inner`` (SP [0,2] [1,3], EP [0,1] [2,3]), bit for bit;
- DICE with EP size 2 under ``dp-inner`` (EP groups [0,2] [1,3]: across 2 nodes of 2 ranks)
  equals the same run under ``ep-inner`` (EP [0,1] [2,3]) bit for bit;

and the pipeline built, and recorded, the groups of the layout asked for. So the sample-directory
fingerprint needs no layout, and ``auto`` may choose any layout on any hosts."""
import numpy as np
from distributed import run_ranks
from golden_modes import DEBUG, FIXTURES, LABELS, SEED, cases

MESH = ("debug/ep-sp", "debug/hybrid")
RUNS = [("sp-inner", name) for name in MESH] + [("ep-inner", "dice@2"), ("dp-inner", "dice@2")]


def _runs(rank, world):
    from dice_ds import DiTMoEPipeline
    from dice_ds.modes import by_key
    from dice_ds.options import from_overrides, parse_options

    out = {}
    for layout, name in RUNS:
        flags, settings = (DEBUG, {**by_key("dice").settings, "ep_size": 2}) if name == "dice@2" \
            else cases(world)[name]
        pipe = DiTMoEPipeline(from_overrides({**settings, "rank_layout": layout},
                                             base=parse_options(list(flags))), output_ranks="rank0")
        got = pipe(class_labels=LABELS["debug"], seed=SEED, output_type="latent")
        out[(layout, name)] = (got.images.numpy() if rank == 0 else None, pipe.groups.describe(),
                               pipe.placement.record())
        pipe.runtime.detach()
    return out


def test_the_layout_changes_the_groups_not_the_images(tmp_path):
    want = np.load(FIXTURES[4])
    got = run_ranks(_runs, 4, tmp_path, timeout=400)
    for layout, name in RUNS:
        record = got[0][(layout, name)][2]
        assert record["order"] == layout and record["why"] == f"--rank-layout {layout}"
        for rank in range(4):  # each rank's groups are the layout's
            described = got[rank][(layout, name)][1]
            assert described["ep_ranks"] in record["groups"]["ep"] and rank in described["ep_ranks"]
            assert described.get("sp_ranks") in record["groups"].get("sp", [None])
    for name in MESH:
        assert got[0][("sp-inner", name)][2]["groups"]["sp"] == [[0, 1], [2, 3]]
        assert np.array_equal(got[0][("sp-inner", name)][0], want[name]), name
    assert got[0][("dp-inner", "dice@2")][2]["groups"]["ep"] == [[0, 2], [1, 3]]
    assert got[0][("ep-inner", "dice@2")][2]["groups"]["ep"] == [[0, 1], [2, 3]]
    assert np.array_equal(got[0][("dp-inner", "dice@2")][0], got[0][("ep-inner", "dice@2")][0])
