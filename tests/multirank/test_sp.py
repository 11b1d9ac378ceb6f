"""Sequence parallelism on gloo ranks: sync SP equals the single-process model, displaced SP's K/V
staleness step by step, a batch boundary clears everything.

Sync SP: every rank builds the debug DiT-MoE (all experts) and feeds the SAME global batch; the
SP-parallel output must match a single-process model of the same weights (fp32, max abs error
<= 1e-5: only the blocking of the attention / expert matmuls differs), plain and CFG forward.

Displaced SP (layer-level harness like test_ep_staleness): at step i attention layer l gets its own
full input h[b, i, l] (seeded by batch, step, layer; the same on every rank), each rank its
contiguous chunk. An output is identified as attention of this rank's fresh queries against K/V
whose own chunk comes from one (batch, step) and whose remote chunks come from another, searched
over every pair: sync steps must be (i, i), async steps (i, i + 1), always within the batch.
"""
import pytest
import torch

from distributed import run_ranks

SEED = 5
ATOL = 1e-5
S = 6
DEPTH = 4


def _build(cfg, plan_kw, world):  # SP size: world / EP size
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.apply import parallelize_dit_moe
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups
    from dice_ds.parallel.plan import ParallelPlan

    plan = ParallelPlan(sp_size=world // plan_kw.get("ep_size", 1), **plan_kw)
    groups = build_groups(ParallelDims(world, plan.ep_size, plan.sp_size))
    model = init_weights(build_model(cfg, groups), "random", seed=SEED)
    rt = parallelize_dit_moe(model, plan, groups)
    return model, rt


def _schedule(rt, steps, depth):
    """The batch schedule of ``rt``'s plan (an SP runtime, or a stack ending with one)."""
    from dice_ds.schedule import Schedule

    plan = rt.plan if hasattr(rt, "plan") else rt.runtimes[-1].plan
    return Schedule.build(plan, steps, depth)


def _rf(model, rt, z, y, steps, cfg_scale):
    """RF through the pipeline's loop (with ``rt`` under its schedule, or single-process)."""
    from dice_ds.diffusion import step_rule
    from dice_ds.pipeline.denoise import denoise

    sched = _schedule(rt, steps, len(model.blocks)) if rt is not None else None
    return denoise(step_rule("rf", steps), model, z, y, cfg_scale, runtime=rt, schedule=sched)


def _global_batch(cfg, n=3):
    g = torch.Generator().manual_seed(1234)  # the same on every rank: the SP group's global batch
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.rand(n, generator=g), torch.randint(0, cfg.num_classes, (n,), generator=g)


@torch.no_grad()
def _sync_sp_vs_single(rank, world, plan_kw):
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.groups import local_model_groups

    cfg = get_flavor("debug")
    ref = init_weights(build_model(cfg, local_model_groups()), "random", seed=SEED)
    model, rt = _build(cfg, plan_kw, world)
    x, t, y = _global_batch(cfg)
    with rt.batch(_schedule(rt, 1, cfg.depth)):
        rt.begin_step(1)
        out = model(x, t, y)
    with rt.batch(_schedule(rt, 1, cfg.depth)):
        rt.begin_step(1)
        cfg_out = model.forward_with_cfg(x, t, y, 1.5)
    ref_out, ref_cfg = ref(x, t, y), ref.forward_with_cfg(x, t, y, 1.5)
    z = _rf(model, rt, x, y, 3, 1.5)
    z_ref = _rf(ref, None, x, y, 3, 1.5)
    return {"forward": (out - ref_out).abs().max().item(),
            "cfg": (cfg_out - ref_cfg).abs().max().item(),
            "rf3": (z - z_ref).abs().max().item(),
            "nontrivial": ref_out.abs().mean().item() > 1e-3,
            "stats": rt.stats(), "inflight": rt.inflight_handles()}


def _check_exact(results, world):
    for r in results:
        assert r["nontrivial"]
        assert r["forward"] <= ATOL and r["cfg"] <= ATOL and r["rf3"] <= ATOL, r
        assert r["stats"]["sp_size"] == world and r["inflight"] == 0


def test_sync_sp_2_ranks_equals_single_process(tmp_path):
    _check_exact(run_ranks(_sync_sp_vs_single, 2, tmp_path, {}), 2)


def test_sync_sp_and_all_sync_displaced_sp_4_ranks(tmp_path):
    """4 ranks (4 tokens each); displaced SP whose warm-up covers every step is exact too."""
    for name, kw in (("sync", {}), ("df", dict(sp_async=True, sp_warmup=10))):
        d = tmp_path / name
        d.mkdir()
        _check_exact(run_ranks(_sync_sp_vs_single, 4, d, kw), 4)


# ------------------------------------------------------------------------------- displaced SP
def _inputs(cfg, batch: int, n_img: int = 2) -> dict:
    h = {}
    for i in range(1, S + 1):
        for l in range(DEPTH):
            g = torch.Generator().manual_seed(batch * 100_003 + i * 101 + l)
            h[batch, i, l] = torch.randn(n_img, cfg.num_tokens, cfg.hidden_size, generator=g)
    return h


def _identify(attn, out, h, b, i, l, rank, world):
    """((own source), (remote source), error, runner-up error) over every (batch, step) pair."""
    import torch.nn.functional as F

    t = out.shape[1]
    sl = slice(rank * t, (rank + 1) * t)
    q = attn.qkv_heads(h[b, i, l])[0][:, :, sl]
    kv = {key[:2]: attn.qkv_heads(x)[1:] for key, x in h.items() if key[2] == l}
    errs = {}
    for own in kv:
        for remote in kv:
            k, v = (torch.cat([kv[own if r == rank else remote][j][:, :, r * t:(r + 1) * t]
                               for r in range(world)], dim=2) for j in (0, 1))
            expect = attn.out(F.scaled_dot_product_attention(q, k, v))
            errs[own, remote] = (out - expect).abs().max().item()
    ranked = sorted(errs, key=errs.get)
    return ranked[0][0], ranked[0][1], errs[ranked[0]], errs[ranked[1]]


@torch.no_grad()
def _displaced_ranks(rank, world, warmup, bucket_layers):
    from dice_ds.config import get_flavor
    from dice_ds.parallel.sp import SequenceParallelRuntime

    cfg = get_flavor("debug").replace(depth=DEPTH)
    model, rt = _build(cfg, dict(sp_async=True, sp_warmup=warmup,
                                 sp_bucket_layers=bucket_layers), world)
    sp = rt[SequenceParallelRuntime]
    h = {**_inputs(cfg, 0), **_inputs(cfg, 1)}
    t = cfg.num_tokens // world
    found, inflight, held = {}, {}, {}
    for b in (0, 1):
        with rt.batch(_schedule(rt, S, DEPTH)):
            held[b, "reset"] = sp.held_bytes()
            for i in range(S, 0, -1):
                rt.begin_step(i)
                for l in range(DEPTH):
                    attn = model.blocks[l].attn
                    out = attn(h[b, i, l][:, rank * t:(rank + 1) * t])
                    found[b, i, l] = _identify(attn, out, h, b, i, l, rank, world)
                inflight[b, i] = rt.inflight_handles()
                held[b, i] = sp.held_bytes()
    return {"found": found, "inflight": inflight, "held": held, "stats": rt.stats(),
            "after_finish": (rt.inflight_handles(), sp.held_bytes())}


def _check_displaced(results, warmup, bucket_layers):
    sync = set(range(S, S - warmup - 1, -1))
    buckets = -(-DEPTH // bucket_layers)
    for res in results:
        for (b, i, l), (own, remote, err, runner_up) in res["found"].items():
            assert own == (b, i), (b, i, l, own, remote)                  # own K/V fresh
            assert remote == ((b, i) if i in sync else (b, i + 1)), (b, i, l, own, remote)
            assert err < ATOL and runner_up > 100 * ATOL, (b, i, l, err, runner_up)
        for b in (0, 1):
            assert res["held"][b, "reset"] == 0                          # a batch starts empty
            for i in range(S, 0, -1):
                # async steps leave one all-gather in flight per bucket; sync steps none
                assert res["inflight"][b, i] == (0 if i in sync else buckets), (b, i)
                assert res["held"][b, i] > 0
        assert res["after_finish"] == (0, 0)
        st = res["stats"]
        assert st["sp_mode"] == "displaced" and st["sp_sync_steps"] == sorted(sync, reverse=True)
        assert st["sp_kv_bytes_exchanged_async"] > 0 and st["sp_kv_bytes_exchanged_sync"] > 0
        assert st["sp_all_gathers"] == 2 * (len(sync) * DEPTH + (S - len(sync)) * buckets)


@pytest.mark.parametrize("warmup,bucket_layers", [(0, 4), (2, 3)])
def test_displaced_sp_remote_kv_one_step_stale_2_ranks(tmp_path, warmup, bucket_layers):
    """Own K/V fresh, remote K/V exactly 1 step stale on async steps, warm-up exact, and the
    second batch never sees the first (reset clears everything). Buckets of 4 and 3 layers."""
    _check_displaced(run_ranks(_displaced_ranks, 2, tmp_path, warmup, bucket_layers), warmup,
                     bucket_layers)


def test_displaced_sp_4_ranks(tmp_path):
    _check_displaced(run_ranks(_displaced_ranks, 4, tmp_path, 1, 2), 1, 2)


# ------------------------------------------------------------------ EP x SP and --single-img
@torch.no_grad()
def _sampled_vs_single(rank, world, plan_kw, n):
    """RF-sample batch 0 of this rank as the sampler does (dice_ds.parallel.sp_batches) and the
    same indices with a single-process model."""
    from dice_ds.config import get_flavor
    from dice_ds.diffusion import draw_conditions
    from dice_ds.models import build_model, init_weights
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import local_model_groups
    from dice_ds.parallel.sp_batches import sp_batches

    cfg = get_flavor("debug")
    ref = init_weights(build_model(cfg, local_model_groups()), "random", seed=SEED)
    model, rt = _build(cfg, plan_kw, world)
    written, err = [], 0.0
    plan = rt.runtimes[1].plan
    for indices, mine in sp_batches(plan, ParallelDims(world, plan.ep_size, plan.sp_size), 0,
                                    rank, n):
        z, y, _ = draw_conditions(7, indices, cfg.in_channels, cfg.input_size, cfg.num_classes)
        x = _rf(model, rt, z, y, 3, 1.5)[mine]
        if len(x):
            z_own, y_own, _ = draw_conditions(7, indices[mine], cfg.in_channels, cfg.input_size,
                                              cfg.num_classes)
            err = max(err, (x - _rf(ref, None, z_own, y_own, 3, 1.5)).abs().max().item())
            written += indices[mine]
    return {"written": written, "err": err, "stats": rt.stats()}


def test_ep_x_sp_2x2_mesh_and_single_img_4_ranks(tmp_path):
    """EP x SP on the 2x2 mesh (SP [0,2] [1,3] shards tokens, EP [0,1] [2,3] exchanges each
    shard's expert work) and --single-img over 4 SP ranks (one image at a time): every rank
    writes exactly its DP indices, equal to the single-process samples."""
    from dice_ds.outputs import batch_indices

    cases = {"ep_x_sp": (dict(ep_size=2), 2), "single_img": (dict(single_img=True), 1)}
    for name, (kw, n) in cases.items():
        d = tmp_path / name
        d.mkdir()
        results = run_ranks(_sampled_vs_single, 4, d, kw, n)
        for rank, r in enumerate(results):
            assert r["written"] == batch_indices(0, rank, 4, n), (name, rank)
            assert r["err"] <= ATOL, (name, rank, r["err"])
        if name == "ep_x_sp":
            assert results[0]["stats"]["ep_size"] == 2 and results[0]["stats"]["sp_size"] == 2
            assert results[0]["stats"]["a2a_bytes_sent"] > 0  # EP really exchanged tokens
