"""Predictions per mode for ``dice-ds plan``: the mode table, group sizes, plans and results.

Owns ``PLAN_MODES`` (the bench's modes of ``dice_ds.modes`` plus ``hybrid`` = DICE over an EP group
x displaced SP of size 2), the EP / SP sizes a mode gets on W GPUs (EP size is capped by E, SP by
``SP_CAP``; the rest of the world is data parallel and does not change per-GPU time; ``ep-sp``,
sync EP x sync SP, is sized as ``hybrid`` and predicted when asked, not a default row), the
``ParallelPlan`` of a mode (built by ``dice_ds.options.build_plan`` from the mode's settings over
the workload's job settings, so the schedule is the one the sampler would run; no flag string is
parsed) and ``predict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dice_ds.config import FLAVORS
from dice_ds.ds_config import Settings
from dice_ds.modes import mode_settings
from dice_ds.options import build_plan as options_plan
from dice_ds.options import flags_of, from_overrides
from dice_ds.plan.costs import LayerCosts
from dice_ds.plan.memory import memory
from dice_ds.plan.presets import Link
from dice_ds.plan.sim import Loads, simulate
from dice_ds.schedule import Schedule
from dice_ds.workload import Workload, messages

PLAN_MODES = ("dp", "sync", "displaced", "interweaved", "dice", "dice-bf16", "sp", "sp-async",
              "hybrid")
SP_CAP = 8
"""SP size cap (DistriFusion's largest setting; 256 tokens / 8 = 32 per rank)."""


@dataclass(frozen=True)
class Topology:
    """Ranks per node and the inter-node link, for groups larger than a node."""

    gpus_per_node: int = 8
    inter: Link | None = None


def sizes(mode: str, world: int, num_experts: int) -> tuple[int, int]:
    """(EP size, SP size) of ``mode`` on ``world`` GPUs."""
    ep_max = max(d for d in range(1, min(world, num_experts) + 1)
                 if num_experts % d == 0 and world % d == 0)
    if mode == "dp":
        return 1, 1
    if mode in ("sp", "sp-async"):
        return 1, max(d for d in range(1, min(world, SP_CAP) + 1) if world % d == 0)
    if mode in ("hybrid", "ep-sp"):
        ep = max(d for d in range(1, min(world // 2, num_experts) + 1)
                 if num_experts % d == 0 and (world // 2) % d == 0)
        return ep, 2
    return ep_max, 1


def job_settings(w: Workload) -> dict:
    """The ``dice-ds sample`` settings of a workload (the flavor only sizes the token count: E and
    depth are passed to the plan's validation)."""
    side = int(round(math.sqrt(w.tokens_per_image))) * w.cfg.patch_size * 8
    return {"model": w.cfg.name if w.cfg.name in FLAVORS else "debug", "vae": "none",
            "image_size": side, "num_sampling_steps": w.steps, "init": "random"}


def build_plan(settings: dict | Settings, w: Workload, world: int):
    """The validated ParallelPlan the sampler would build from these settings (a mode's partial
    tree over the workload's job, or a whole ``Settings``)."""
    # the job over the mode: disjoint for the modes of dice_ds.modes; a --mode-config file's job
    # settings are overridden by the bench's job, as in the bench's runs (dice_ds.bench.cli)
    opts = settings if isinstance(settings, Settings) else from_overrides(
        job_settings(w), base=from_overrides(settings))
    return options_plan(opts, world_size=world, num_experts=w.cfg.num_experts, depth=w.cfg.depth)


def group_link(link: Link, group: int, topo: Topology) -> Link:
    """The link a group of ``group`` ranks sees: intra-node, or limited by the off-node share."""
    if group <= topo.gpus_per_node or topo.inter is None:
        return link
    off = (group - topo.gpus_per_node) / (group - 1)
    bw = 1.0 / max((1 - off) / link.bandwidth, off / topo.inter.bandwidth)
    return Link(f"{link.name} + {topo.inter.name}", bw, max(link.latency, topo.inter.latency),
                max(link.hol_bytes, topo.inter.hol_bytes))


def predict_plan(plan, w: Workload, costs: LayerCosts, link: Link, loads: Loads | None = None,
                 topo: Topology = Topology(), cores: float = 0.0,
                 sp_link: Link | None = None, replicas: int = 0,
                 remote_share: float | None = None) -> dict:
    """Prediction for a validated ``ParallelPlan``; ``sp_link``: the SP groups' own link when it
    is not the EP groups' (a two-level fabric, ``dice_ds.plan.fabric``); ``replicas``: extra
    expert slots per rank of an expert placement (their weights count in the memory);
    ``remote_share``: the share of routed rows that leave their rank under that placement
    (``dice_ds.plan.placement.remote_share``; None: megatron's (W - 1) / W)."""
    sched = Schedule.build(plan, w.steps, w.cfg.depth)
    msgs = messages(w, plan.ep_size, plan.sp_size, plan.payload_dtype)
    if remote_share is not None and plan.ep_size > 1:
        f = remote_share / ((plan.ep_size - 1) / plan.ep_size)
        msgs = replace(msgs, dispatch=msgs.dispatch * f, combine=msgs.combine * f)
    lk = group_link(link, plan.ep_size * plan.sp_size, topo)
    res = simulate(sched, costs, msgs, lk, ranks=max(plan.ep_size, 1),
                   loads=loads if plan.ep_size > 1 else None, cores=cores, sp_link=sp_link)
    return {"ep": plan.ep_size, "sp": plan.sp_size,
            "batch_seconds": res.seconds, "step_seconds": res.seconds / w.steps,
            "compute_seconds": res.compute, "comm_share": res.comm_share,
            "bytes_per_rank": res.bytes_per_rank, "stalls": res.stalls, "link": lk.name,
            "memory": memory(w, sched, plan.ep_size, plan.sp_size, plan.payload_dtype,
                             replicas)}


def predict(mode: str, w: Workload, costs: LayerCosts, link: Link, world: int,
            loads: Loads | None = None, topo: Topology = Topology(), settings=None,
            cores: float = 0.0, remote_share: float | None = None) -> dict:
    """One mode's prediction: batch and step seconds, comm share, bytes, memory per GPU.
    ``settings``: the mode's own (a ``--mode-config`` file's), else ``dice_ds.modes``'."""
    ep, sp = sizes(mode, world, w.cfg.num_experts)
    settings = dict(settings) if settings is not None else mode_settings(mode, ep, sp)
    plan = build_plan(settings, w, ep * sp)
    replicas = settings.get("expert_replicas", 0)
    return {"mode": mode, "settings": settings, "flags": " ".join(flags_of(settings)),
            **predict_plan(plan, w, costs, link, loads, topo, cores, replicas=replicas,
                           remote_share=remote_share)}


def predict_all(w: Workload, costs: LayerCosts, link: Link, world: int, modes=PLAN_MODES,
                loads: Loads | None = None, topo: Topology = Topology()) -> list[dict]:
    rows = [predict(m, w, costs, link, world, loads, topo) for m in modes]
    sync = next((r for r in rows if r["mode"] == "sync"), None)
    for r in rows:
        r["speedup"] = sync["batch_seconds"] / r["batch_seconds"] if sync else None
    return rows
