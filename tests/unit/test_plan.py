"""dice_ds.plan: message sizes, FLOPs, link topology and the simulated schedule on hand-computed
cases (no process group)."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest

from dice_ds.config import ModelConfig
from dice_ds.parallel.plan import ParallelPlan
from dice_ds.plan.costs import LayerCosts, costs_from_phases, layer_flops
from dice_ds.plan.memory import memory
from dice_ds.plan.predict import Topology, group_link, predict, sizes
from dice_ds.plan.presets import Link, parse_link
from dice_ds.plan.sim import lone_exchange, simulate
from dice_ds.schedule import Schedule
from dice_ds.workload import Messages, Workload, messages

CFG = ModelConfig("t", depth=2, hidden_size=8, num_heads=2, num_experts=4, input_size=4)
W = Workload(CFG, images_per_rank=1, cfg_guidance=True, steps=3, dtype="fp32")
C = LayerCosts(attn=1.0, router=0.5, shared=0.5, experts=2.0, post=0.0)   # 4 s per layer call


def test_rows_messages_and_flops():
    assert CFG.num_tokens == 4 and W.rows == 8                # 1 image x CFG 2 x 4 tokens
    m = messages(W, ep=2)
    slots = 8 * 2 / 2                                         # N k (W-1)/W
    assert m.dispatch == slots * (8 + 1) * 4                  # h + 1 prob column, fp32
    assert m.combine == slots * 8 * 4
    assert messages(W, ep=2, payload="bf16").dispatch == slots * (8 + 2) * 2
    assert messages(W, ep=1).dispatch == 0
    f = layer_flops(W)
    assert f["experts"] == 6 * 8 * 2 * 8 * 32 and f["router"] == 2 * 8 * 8 * 4
    assert f["shared"] == 6 * 8 * 8 * 16


def test_link_presets_and_topology():
    assert parse_link("300mbit").bandwidth == pytest.approx(300e6 / 8)
    assert parse_link("pcie4@6").bandwidth == 6e9
    assert parse_link("pcie4@6").latency == parse_link("pcie4").latency
    intra, inter = Link("a", 100.0, 0.0), Link("b", 10.0, 0.0)
    g = group_link(intra, 16, Topology(8, inter))
    off = 8 / 15                                              # off-node share of remote bytes
    assert g.bandwidth == pytest.approx(1 / max((1 - off) / 100.0, off / 10.0))
    assert group_link(intra, 8, Topology(8, inter)) is intra
    assert sizes("sync", 64, 8) == (8, 1) and sizes("sync", 16, 16) == (16, 1)
    assert sizes("sp", 64, 8) == (1, 8) and sizes("hybrid", 8, 8) == (4, 2)
    assert sizes("dp", 8, 8) == (1, 1)


def _sched(**kw):
    return Schedule.build(ParallelPlan(**kw), 3, 2)


FAST = Link("fast", 1e18, 0.0)
SLOW = Link("slow", 1.0, 0.0)          # 1 byte/s: comm dominates
MSG = Messages(dispatch=10.0, combine=10.0, counts=0.0)


def test_dp_and_sync_ep_are_serial_sums():
    dp = simulate(_sched(), C, Messages(0, 0, 0), FAST, ranks=1)
    assert dp.seconds == pytest.approx(3 * 2 * 4.0)
    sync = simulate(_sched(ep_size=2), C, MSG, SLOW, ranks=2)
    # every call: 4 s compute + dispatch 10 s + combine 10 s, serially
    assert sync.seconds == pytest.approx(3 * 2 * (4.0 + 20.0))
    assert sync.comm_share == pytest.approx(20 / 24)


def test_imbalance_makes_the_combine_wait_for_the_slowest_rank():
    loads = lambda i, l: [1.5, 0.5]                                  # noqa: E731
    r = simulate(_sched(ep_size=2), C, Messages(0, 0, 0), FAST, ranks=2, loads=loads)
    assert r.seconds == pytest.approx(6 * (2.0 + 2.0 * 1.5))


def test_displaced_hides_comm_when_it_is_cheap():
    plan = dict(ep_size=2, mode="displaced", async_layers="all")
    r = simulate(_sched(**plan), C, MSG, Link("x", 1e3, 0.0), ranks=2)
    # first step sync (2 x (4 + 0.02)), then pure compute; the last combines drain at the end
    assert r.seconds == pytest.approx(2 * 4.02 + 4 * 4.0, abs=0.1)


def test_async_modes_are_bounded_by_the_link_when_comm_bound():
    for mode in ("displaced", "interweaved"):
        r = simulate(_sched(ep_size=2, mode=mode, async_layers="all"), C, MSG, SLOW, ranks=2)
        sync = 3 * 2 * 24.0
        assert 6 * 20.0 <= r.seconds < sync                     # all bytes pass the link
        assert r.bytes_per_rank == pytest.approx(6 * 20.0)


def test_interweaved_dispatch_has_one_layer_to_hide_behind():
    # a stale call posts its dispatch after attention + router + shared (2 s into the layer); the
    # next ring layer needs it 4 s later: a 3.5 s dispatch lands in time, a 4.5 s one stalls
    plan = _sched(ep_size=2, mode="interweaved", async_layers="all")
    ok = simulate(plan, C, Messages(3.5, 0.0, 0.0), SLOW, ranks=2)
    late = simulate(plan, C, Messages(4.5, 0.0, 0.0), SLOW, ranks=2)
    assert ok.stalls.get("wait dispatch", 0.0) == 0.0
    assert late.stalls["wait dispatch"] > 0.4


def test_lone_exchange_both_directions_share_then_full_rate():
    # bw 10 B/s alone, 5 B/s per direction while both send
    assert lone_exchange([0.0, 0.0], [10.0, 10.0], 10.0, 5.0) == pytest.approx([2.0, 2.0])
    # 20 vs 10 bytes: both at 5 B/s for 2 s (10 and 10 moved), then 10 B/s for the last 10 bytes
    assert lone_exchange([0.0, 0.0], [20.0, 10.0], 10.0, 5.0) == pytest.approx([3.0, 2.0])
    # rank 1 starts when rank 0 is done: no overlap, both at the full rate
    assert lone_exchange([0.0, 1.0], [10.0, 10.0], 10.0, 5.0) == pytest.approx([1.0, 2.0])
    # rank 1 starts at 0.5 s: rank 0 moved 5 B alone, then both at 5 B/s until rank 0 is done at
    # 1.5 s (rank 1 has 5 B left), then rank 1 alone at 10 B/s
    assert lone_exchange([0.0, 0.5], [10.0, 10.0], 10.0, 5.0) == pytest.approx([1.5, 2.0])
    # one simulated rank stands for a symmetric group: always the shared rate
    assert lone_exchange([1.0], [10.0], 10.0, 5.0) == pytest.approx([3.0])


def test_sync_ep_on_a_lone_exchange_link():
    # SLOW with a lone rate of 0.5 B/s: each blocking 10 B exchange takes 20 s, not 10 s
    half = Link("half", 1.0, 0.0, single_bandwidth=0.5)
    sync = simulate(_sched(ep_size=2), C, MSG, half, ranks=2)
    assert sync.seconds == pytest.approx(6 * (4.0 + 40.0))


def test_dispatch_egress_follows_the_other_ranks_load():
    # rank 0 computes 1.5x the mean rows, so rank 1 sends it 1.5x the dispatch rows (15 B) and
    # rank 0 sends 0.5x (5 B); the combine mirrors it: rank 0 returns 15 B, rank 1 5 B. Blocking
    # on a 1 B/s link: 15 s each, plus experts 3 s on the busier rank, plus 2 s of the rest
    loads = lambda i, l: [1.5, 0.5]                                  # noqa: E731
    r = simulate(_sched(ep_size=2), C, MSG, SLOW, ranks=2, loads=loads)
    assert r.seconds == pytest.approx(6 * (2.0 + 15.0 + 3.0 + 15.0))


def test_cpu_per_byte_slows_compute_while_the_link_moves_bytes():
    # displaced on a 1 B/s link: 2 B/s move per rank (sent + received) while busy; 0.25 s per
    # byte -> compute 1.5x slower while the link is busy, so the batch gets longer
    plan = _sched(ep_size=2, mode="displaced", async_layers="all")
    msgs = Messages(2.0, 2.0, 0.0)
    base = simulate(plan, C, msgs, Link("a", 1.0, 0.0), ranks=2)
    slow = simulate(plan, C, msgs, Link("b", 1.0, 0.0, cpu_per_byte=0.25), ranks=2)
    assert slow.compute == pytest.approx(base.compute)      # the work is the same
    assert slow.seconds > base.seconds + 1.0
    # work entirely inside a busy window: exactly (1 + k) x longer (R.work on a busy link)
    from dice_ds.plan.sim import _Ranks

    R = _Ranks(1, Link("b", 1.0, 0.0, cpu_per_byte=0.25))
    R.free[0] = 10.0
    R.work(0, 2.0)
    assert R.t[0] == pytest.approx(3.0)
    R.work(0, 10.0)                # 7 s of busy link left: 7 / 1.5 of work done, rest at speed
    assert R.t[0] == pytest.approx(10.0 + 10.0 - 7.0 / 1.5)


def test_skip_halves_the_bytes_of_skip_steps():
    base = simulate(_sched(ep_size=2), C, MSG, FAST, ranks=2).bytes_per_rank
    skip = simulate(_sched(ep_size=2, skip_period=2, skip_strategy="low"), C, MSG, FAST,
                    ranks=2).bytes_per_rank
    # 3 steps: i = 3 (first, never skips), 2 (2 % 2 == 0: full), 1 (skips): 2.5 of 3 steps
    assert skip == pytest.approx(base * 2.5 / 3)


def test_memory_interweaved_is_about_half_of_displaced():
    big = Workload(CFG.replace(depth=8), images_per_rank=2, steps=4, dtype="fp32")
    disp = memory(big, Schedule.build(ParallelPlan(ep_size=2, mode="displaced",
                                                   async_layers="all"), 4, 8), 2, 1, None)
    iw = memory(big, Schedule.build(ParallelPlan(ep_size=2, mode="interweaved",
                                                 async_layers="all"), 4, 8), 2, 1, None)
    assert 0.5 <= iw["stale_cache"] / disp["stale_cache"] <= 0.6
    n, h = big.rows, 8
    assert disp["stale_cache"] == 8 * (n * 2 * (h + 1) * 4 + n * 2 * h * 4)


def test_costs_from_phases_spread_the_rest_over_layer_calls():
    row = {"seconds": 10.0, "phases": {"router": 1.0, "preprocess": 1.0, "shared": 2.0,
                                       "experts": 4.0, "dispatch": 0.5, "combine": 0.5}}
    c = costs_from_phases(row, depth=2, steps=5)
    assert (c.router, c.shared, c.experts, c.post) == (0.2, 0.2, 0.4, 0.1)
    assert c.attn == pytest.approx(1.0 / 10)
    assert c.total * 10 == pytest.approx(10.0)


def test_predict_builds_the_samplers_plan():
    r = predict("dice", W, C, FAST, 2)
    assert r["ep"] == 2 and "--ep-async-pipeline" in r["flags"]
    assert math.isfinite(r["batch_seconds"]) and r["memory"]["skip_cache"] > 0


def test_config_modes_come_from_the_bench_command_line():
    from dice_ds.plan.validate import config_modes

    bench = {"meta": {"command": "dice-ds bench --modes sync,t --mode-config t=cfg/a.json "
                                 "--mode-config=u=b.json --rounds 1"}}
    assert config_modes(bench) == {"t": "cfg/a.json", "u": "b.json"}
    assert config_modes({"meta": {}}) == {}


def test_mode_configs_of_reads_a_command_line_as_the_bench_parser_does():
    from dice_ds.bench.cli import _parser
    from dice_ds.bench.modeconfig import mode_configs_of, split_mode_config

    for cmd in ("--rounds 1 --mode-config t=a.json --out o -- --mode-config z=c.json",
                "--mode-c v=v.json --modes sync,v --links loopback",
                "--mode-config bad --mode-config=w=x=y.json", ""):
        known, _ = _parser().parse_known_args(cmd.split())
        want = {x[0]: x[1] for x in map(split_mode_config, known.mode_config) if x}
        assert mode_configs_of("dice-ds bench " + cmd) == want, cmd
    assert mode_configs_of("dice-ds bench --out o -- --mode-config z=c.json") == {}
    assert mode_configs_of("--mode-config=w=x=y.json") == {"w": "x=y.json"}


def test_validation_at_n_ranks_scales_the_calibration_by_the_core_share(tmp_path):
    """A 4-rank bench predicted from a 2-rank calibration on 2 cores: every CPU cost twice as
    long (max(1, 4 / 2) over max(1, 2 / 2)); a calibration of another job is refused."""
    import copy
    import json

    from dice_ds.plan.validate import cpu_share, pooled_dp, validate

    cal = json.loads(open("docs/bench_v2.json").read())
    cal["_path"] = "docs/bench_v2.json"
    four = copy.deepcopy(cal)
    four["meta"].update(ranks=4, cpus=2)
    cal["meta"]["cpus"] = 2
    assert cpu_share(cal) == 1.0 and cpu_share(four) == 2.0
    plain = {(r["link"], r["mode"]): r for r in validate(cal, use_loads=False, links=("loopback",))}
    scaled = {(r["link"], r["mode"]): r
              for r in validate(four, use_loads=False, links=("loopback",), calib=cal)}
    dp = scaled["loopback", "dp"]
    assert not dp["calibration"] and dp["ranks"] == 4 and dp["cpu_share"] == 2.0
    assert dp["predicted"] == pytest.approx(2 * plain["loopback", "dp"]["predicted"])
    # DP's time does not depend on the link: measured as the median of every DP run of the bench
    assert dp["measured_pooled"] and dp["measured"] == pytest.approx(
        pooled_dp(four)["seconds"])
    assert not plain["loopback", "dp"]["measured_pooled"]
    # sync EP at 4 ranks sends 3/4 of its slots off-rank (2 ranks: 1/2)
    assert scaled["loopback", "sync"]["bytes_predicted"] == pytest.approx(
        1.5 * plain["loopback", "sync"]["bytes_predicted"], rel=1e-6)
    other = copy.deepcopy(four)
    other["meta"]["job"] = other["meta"]["job"].replace("--num-sampling-steps 10",
                                                        "--num-sampling-steps 20")
    with pytest.raises(ValueError, match="--calibration runs another job"):
        validate(other, use_loads=False, calib=cal)


def test_mesh_modes_get_ep_and_sp_sizes():
    assert sizes("ep-sp", 4, 8) == (2, 2) and sizes("ep-sp", 8, 8) == (4, 2)
    p = predict("ep-sp", W, C, Link("l", 1e9, 0.0), 4)
    assert (p["ep"], p["sp"]) == (2, 2)


def test_shared_cores_is_processor_sharing():
    from dice_ds.plan.sim import shared_cores

    assert shared_cores([1.0] * 4, 2) == pytest.approx([2.0] * 4)      # all busy: half a core
    # 4 jobs on 2 cores: the two short ones end at 1 s (rate 1/2), then each gets a whole core
    assert shared_cores([0.5, 0.5, 1.0, 2.0], 2) == pytest.approx([1.0, 1.0, 1.5, 2.5])
    assert shared_cores([1.0, 3.0], 2) == pytest.approx([1.0, 3.0])     # a core each


def test_sync_experts_share_the_cores_when_ranks_outnumber_them():
    """4 EP ranks on 2 cores, one rank with all the expert rows of a layer: with the cores
    shared it computes at a whole core once the others wait, so the batch is shorter than
    charging it twice its load at the all-busy share."""
    sched = Schedule.build(ParallelPlan(ep_size=4), 3, 2)
    msgs = messages(W, ep=4)
    link = Link("l", 1e12, 0.0)
    skew = lambda i, l: [4.0, 0.0, 0.0, 0.0]   # noqa: E731
    costs = C.scaled(2.0)                      # the all-busy share of 4 ranks on 2 cores
    plain = simulate(sched, costs, msgs, link, ranks=4, loads=skew).seconds
    shared = simulate(sched, costs, msgs, link, ranks=4, loads=skew, cores=2).seconds
    # per layer call the experts cost 2 x 4 x 2 s = 16 s charged plainly, 4 x 2 s = 8 s shared
    assert plain - shared == pytest.approx(3 * 2 * 8.0, rel=1e-6)
    even = lambda i, l: [1.0] * 4              # noqa: E731
    assert simulate(sched, costs, msgs, link, ranks=4, loads=even, cores=2).seconds == \
        pytest.approx(simulate(sched, costs, msgs, link, ranks=4, loads=even).seconds)


def test_plan_without_sync_ep_renders(tmp_path):
    """`dice-ds plan --modes dp`: no sync row, so no speed-up; the tables say '–'."""
    from dice_ds.plan.cli import main

    assert main(["--models", "DiT-XL/2", "--gpus", "8", "--modes", "dp", "--scenarios",
                 "h100:nvlink-h100", "--out", str(tmp_path)]) == 0
    assert "| dp | 1 x 1 |" in (tmp_path / "plan.md").read_text()


def test_gather_is_a_ring_beyond_two_ranks():
    """gloo's all-gather is a ring: at 2 ranks its one connection carries both directions (the
    lone gather rate), beyond 2 each connection carries one direction (the pipelined rate)."""
    from dice_ds.plan.sim import gather_rate

    link = Link("l", 10.0, 0.0, single_bandwidth=4.0, gather_bandwidth=6.0)
    assert gather_rate(link, 2) == 6.0
    assert gather_rate(link, 3) == gather_rate(link, 8) == 10.0
    assert gather_rate(Link("l", 10.0, 0.0, single_bandwidth=4.0), 2) == 4.0
    # sync SP over 4 ranks, one 30 B K/V gather per layer call at 10 B/s instead of 6 B/s
    sched = Schedule.build(ParallelPlan(sp_size=4), 3, 2)
    msgs = Messages(0.0, 0.0, 0.0, kv=30.0, x=0.0)
    t = simulate(sched, C, msgs, link, ranks=1).seconds
    assert t == pytest.approx(6 * (4.0 + 3.0))


def test_cpu_bound_caps_every_rate_of_a_collective_by_its_ranks():
    """g ranks on `cores` cores whose own CPU costs c s per byte sent move at most
    cores / (g c) B/s each; without a measured cost or shared cores nothing changes."""
    from dice_ds.plan.presets import cpu_bound

    link = Link("l", 10.0, 0.0, single_bandwidth=8.0, gather_bandwidth=9.0,
                cpu_own_per_byte=0.05)
    capped = cpu_bound(link, 8, 2.0)           # 2 / (8 x 0.05) = 5 B/s
    assert (capped.bandwidth, capped.single_bandwidth, capped.gather_bandwidth) == (5.0, 5.0, 5.0)
    pair = cpu_bound(link, 2, 2.0)             # 20 B/s: above every rate
    assert (pair.bandwidth, pair.lone_rate, pair.gather_bandwidth) == (10.0, 8.0, 9.0)
    assert cpu_bound(link, 8, 0.0) == link
    assert cpu_bound(replace(link, cpu_own_per_byte=0.0), 8, 2.0).bandwidth == 10.0
    # sync EP over 8 ranks on 2 cores: the blocking exchanges move at 5 B/s, not 8
    sched = Schedule.build(ParallelPlan(ep_size=8), 3, 2)
    msgs = Messages(10.0, 10.0, 0.0)
    fast = simulate(sched, C, msgs, replace(link, cpu_own_per_byte=0.0), ranks=8, cores=2.0)
    slow = simulate(sched, C, msgs, link, ranks=8, cores=2.0)
    assert slow.seconds - fast.seconds == pytest.approx(6 * 2 * (10.0 / 5.0 - 10.0 / 8.0))


def test_calibrated_link_reads_the_probes_own_cpu_per_byte():
    from dice_ds.plan.presets import calibrated_link

    probe = {"ok": True, "throughput_bits": 80.0, "bytes_per_call": 100, "calls": 10,
             "lone_throughput_bits": 40.0, "cpu_seconds_rank": [0.5, 1.5]}
    link = calibrated_link("100mbit", probe)
    assert link.cpu_own_per_byte == pytest.approx(1.0 / 1000)
    assert (link.bandwidth, link.lone_rate) == (10.0, 5.0)
    del probe["cpu_seconds_rank"]              # a bench from before the CPU-aware probe
    assert calibrated_link("100mbit", probe).cpu_own_per_byte == 0.0


def test_bench_mode_config_takes_the_jobs_weights(tmp_path):
    """A ``--mode-config`` file written for random weights (``init: random``) runs a ``--ckpt``
    job on the job's checkpoint, and a random job on random weights."""
    from dice_ds.bench import cli
    from dice_ds.options import parse_options

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = os.path.join(root, "configs", "ds", "bench_interweaved_balanced.json")
    p = cli._parser()
    for extra, ckpt, init in ((["--ckpt", "digits"], "digits", None), ([], None, "random")):
        a = p.parse_args(["--ranks", "2", "--mode-config", f"bal={cfg}", *extra])
        cli._check(a, p)
        ran = parse_options(cli.run_config(cli.run_settings(a, a.job, "bal"), tmp_path / "bal"))
        assert (ran.ckpt, ran.init, ran.expert_placement) == (ckpt, init, "balanced")


def test_bench_extra_flags_set_the_workload_that_is_sampled_and_predicted(tmp_path):
    """``dice-ds bench -- --cfg-scale 1``: the runs sample without guidance, and the plan's
    workload (from the job's settings tree in bench.json) has no doubled batch either."""
    from dice_ds.bench import cli
    from dice_ds.ds_config import to_json
    from dice_ds.options import flags_of, given, parse_options
    from dice_ds.plan.validate import workload_of

    p = cli._parser()
    a = p.parse_args(["--ranks", "2", "--steps", "3", "--", "--cfg-scale", "1"])
    cli._check(a, p)
    assert a.job.cfg_scale == 1.0
    for mode in ("dp", "dice"):  # what each run samples: its settings.json
        argv = cli.run_config(cli.run_settings(a, a.job, mode), tmp_path / mode)
        ran = parse_options(argv)
        assert ran.cfg_scale == 1.0 and ran.num_sampling_steps == 3
        assert ran.sample_dir == str(tmp_path / mode / "samples")  # no --sample-dir flag
    assert parse_options(argv).ep_async  # the mode's settings over the job
    meta = {"settings": to_json(a.job), "job": " ".join(flags_of(given(a.job)))}
    w = workload_of({"meta": meta})
    assert not w.cfg_guidance and w.steps == 3
    # the bench's own default guides: both sides agree on the doubled batch
    a = p.parse_args(["--ranks", "2"])
    cli._check(a, p)
    assert workload_of({"meta": {"settings": to_json(a.job)}}).cfg_guidance
    # a bench JSON from before meta.settings: its flags parsed as the sampler parses them (the
    # last --cfg-scale wins), not the first occurrence in the string
    old = ("--model DiT-S/2 --image-size 128 --vae none --num-sampling-steps 10 "
           "--per-proc-batch-size 2 --cfg-scale 1.5 --global-seed 0 --init random --cfg-scale 1")
    assert not workload_of({"meta": {"job": old}}).cfg_guidance
