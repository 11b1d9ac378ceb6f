"""Memory per rank of XL/2 and G/2 under data and expert parallelism, from ``dice-ds plan``'s model.

Prints a markdown table: for each model, dtype and world size W, the predicted bytes per rank of
sync EP on W ranks (W = 1: one process holds everything, the data-parallel footprint) at batch 1
and 32 images per rank, 256 px, CFG: weights (dense + this rank's experts) + the largest
activation transient (``dice_ds/plan/memory.py``), plus ``--overhead-gib`` per process (the
measured CPU process overhead by default: torch, megatron-core and gloo, docs/scale.md; on GPUs
add the CUDA context instead). Async modes add their stale caches (``dice-ds plan`` lists them).

    python scripts/memory_table.py [--models DiT-XL/2,DiT-G/2] [--worlds 1,2,4,8]
"""

from __future__ import annotations

import argparse

GIB = 2**30


def rows(models, worlds, dtypes, batches, overhead_gib):
    from dice_ds.config import get_flavor
    from dice_ds.plan.memory import memory
    from dice_ds.plan.predict import build_plan
    from dice_ds.schedule import Schedule
    from dice_ds.workload import Workload

    for name in models:
        cfg = get_flavor(name)
        for dtype in dtypes:
            cells = []
            for world in worlds:
                per_batch = []
                for batch in batches:
                    w = Workload(cfg, images_per_rank=batch, cfg_guidance=True, steps=50,
                                 dtype=dtype)
                    plan = build_plan({"ep": True} if world > 1 else {}, w, world)
                    m = memory(w, Schedule.build(plan, w.steps, cfg.depth), plan.ep_size, 1, None)
                    per_batch.append(sum(m.values()) / GIB + overhead_gib)
                cells.append(" / ".join(f"{x:.1f}" for x in per_batch))
            yield name, dtype, cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="DiT-XL/2,DiT-G/2")
    ap.add_argument("--worlds", default="1,2,4,8")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--overhead-gib", type=float, default=0.4)
    a = ap.parse_args()
    worlds = [int(x) for x in a.worlds.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    head = " | ".join(f"W = {w}" + (" (one process)" if w == 1 else " (--ep)") for w in worlds)
    print(f"| model | dtype | {head} |")
    print("|---|---|" + "---:|" * len(worlds))
    for name, dtype, cells in rows(a.models.split(","), worlds, a.dtypes.split(","), batches,
                                   a.overhead_gib):
        print(f"| {name} | {dtype} | " + " | ".join(cells) + " |")
    print(f"\nGiB per rank at batch {' / '.join(map(str, batches))} images per rank "
          f"(256 px, CFG), incl. {a.overhead_gib} GiB per process")


if __name__ == "__main__":
    main()
