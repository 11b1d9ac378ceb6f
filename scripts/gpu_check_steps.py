"""The steps of ``scripts/gpu_check.py``, each in its own process (a hang or crash ends one step).

    python scripts/gpu_check_steps.py STEP PARAMS_JSON RESULT_JSON

Owns what each step measures; writes ``{"status", "reason", "results"}`` to RESULT_JSON:

- ``machine``: Python, torch, CUDA, the GPU, versions of the packages that matter, the commit;
- ``tests``: ``pytest tests/gpu`` (the tests that need 2 GPUs skip themselves); counts, skip
  reasons, failures, each test's printed lines (junit XML), or the counts so far on a timeout;
- ``ep_modes``: every EP mode of ``dice_ds.modes`` (sync, then each async one, with the flags
  ``dice-ds sample`` gets and ``dice_ds.plan.predict.build_plan``'s ParallelPlan) at 2 ranks that
  share one device over gloo (tests/distributed.py's ``run_ranks``, the test suite's
  ``euler_sample``), on CUDA when torch has one. The ranks first probe gloo's all_to_all_single
  (even, uneven, async) and all_gather_into_tensor on the device's tensors; if one fails, every
  collective is staged through CPU tensors (``stage_collectives``) and the JSON says so. Per mode:
  finite output, relative difference to sync EP, seconds (max over ranks), remote bytes, cache peak;
  with ``dp_reference``, sync EP against the single-process model;
- ``step_time``: one CFG model step (``forward_with_cfg``) in bf16 with sequential and grouped
  experts (same weights), CUDA events (``perf_counter`` on CPU), warm-up then interleaved rounds,
  medians; the routed experts alone with both and with Transformer Engine's ``GroupedLinear`` if
  importable; peak memory (CUDA) against the plan's memory column; the step time against the
  plan's H100 preset (``dice_ds.plan.presets``, efficiency 0.4) and the efficiency that would make
  the plan match (measured FLOP/s over the dense bf16 peak, 989 TFLOP/s for H100 and H200 SXM).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # run_ranks and the EP-mode helpers of the test suite

GIB = 2**30
TAIL = 1500


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- machine
def machine(p: dict) -> tuple[str, str, dict]:
    import platform
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    import torch.distributed as dist

    import dice_ds

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gloo": dist.is_gloo_available(),
            "nccl": dist.is_nccl_available(), "dice_ds": dice_ds.__version__,
            "dice_ds_path": str(Path(dice_ds.__file__).parent)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / GIB, 1))
    for name in ("megatron-core", "pydantic", "numpy", "pytest", "transformer-engine",
                 "transformer-engine-torch", "deepspeed"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    info["transformer_engine_module"] = find_spec("transformer_engine") is not None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                        capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return "ok", "", info


# ----------------------------------------------------------------------------- tests
def _junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    cases, counts = [], {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = f"{tc.get('classname', '').split('.')[-1]}::{tc.get('name')}"
        outcome, message = "passed", ""
        for tag, what in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            el = tc.find(tag)
            if el is not None:
                outcome, message = what, (el.get("message") or el.text or "")[:400]
                break
        counts[outcome] += 1
        out = tc.find("system-out")
        printed = (out.text or "").strip()[-600:] if out is not None else ""
        cases.append({"test": name, "outcome": outcome, "seconds": float(tc.get("time", 0)),
                      "message": message, "printed": printed})
    return {**counts, "cases": cases}


def _partial(log: str) -> dict:
    """Counts from pytest -v lines so far (a timed-out run writes no junit XML)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for line in log.splitlines():
        for word, key in ((" PASSED", "passed"), (" FAILED", "failed"), (" ERROR", "errors"),
                          (" SKIPPED", "skipped")):
            if "::" in line and word in line:
                counts[key] += 1
                break
    return counts


def tests(p: dict) -> tuple[str, str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider",
               "-o", "junit_logging=system-out", f"--junitxml={xml}", *p["paths"]]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=p["timeout"])
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return "timeout", f"pytest still running after {p['timeout']:.0f} s", {
                **_partial(log), "command": " ".join(cmd[2:]), "log_tail": log[-TAIL:]}
        res = {"command": " ".join(cmd[2:]), "exit_code": proc.returncode}
        if xml.exists():
            res.update(_junit(xml))
        else:
            res.update(_partial(proc.stdout))
        res["log_tail"] = (proc.stdout + proc.stderr)[-TAIL:]
    if res["failed"] or res["errors"] or proc.returncode not in (0, 5):
        return "failed", f"pytest exit {proc.returncode}", res
    if res["passed"] == 0:
        reasons = sorted({c["message"] for c in res.get("cases", []) if c["outcome"] == "skipped"})
        return "skipped", f"all {res['skipped']} tests skipped: {'; '.join(reasons)}", res
    return "ok", "", res


# ----------------------------------------------------------------------------- EP modes
class _Done:
    """A finished collective (what a staged call returns for ``async_op=True``)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def stage_collectives(force: bool = False) -> None:
    """Route all_to_all_single / all_gather_into_tensor on device tensors through CPU copies.

    For a torch whose gloo cannot take CUDA tensors: the call runs on CPU copies, blocking, and an
    ``async_op`` call returns a finished handle (no overlap: the modes still run, their timing is
    not that of an asynchronous exchange). ``force``: stage CPU tensors too (rehearsal on CPU)."""
    import torch.distributed as dist

    real_a2a, real_ag = dist.all_to_all_single, dist.all_gather_into_tensor

    def staged(t: torch.Tensor) -> bool:
        return force or t.device.type != "cpu"

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        if not staged(input):
            return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group,
                            async_op=async_op)
        recv = torch.empty(output.shape, dtype=output.dtype)
        real_a2a(recv, input.detach().cpu().contiguous(), output_split_sizes, input_split_sizes,
                 group=group)
        output.copy_(recv)
        return _Done() if async_op else None

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if not staged(input_tensor):
            return real_ag(output_tensor, input_tensor, group=group, async_op=async_op)
        recv = torch.empty(output_tensor.shape, dtype=output_tensor.dtype)
        real_ag(recv, input_tensor.detach().cpu().contiguous(), group=group)
        output_tensor.copy_(recv)
        return _Done() if async_op else None

    dist.all_to_all_single = all_to_all_single
    dist.all_gather_into_tensor = all_gather_into_tensor
    dist._all_gather_base = all_gather_into_tensor
    import megatron.core.tensor_parallel.mappings as mappings  # binds its all-gather at import

    mappings.dist_all_gather_func = all_gather_into_tensor


def probe_collectives(dev: str) -> dict:
    """gloo on this device's tensors: each collective the EP modes use, checked by value."""
    import torch.distributed as dist

    r = dist.get_rank()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.arange(4, dtype=torch.float32) + 100 * r).to(dev, dtype)

        def check(name, fn, want):
            try:
                got = fn()
                _sync(dev)
                ok = torch.equal(got.float().cpu(), torch.tensor(want, dtype=torch.float32))
                out[f"{name} {str(dtype)[6:]}"] = "ok" if ok else f"wrong values {got.tolist()}"
            except Exception as e:  # noqa: BLE001 - recorded, then staged
                out[f"{name} {str(dtype)[6:]}"] = f"{type(e).__name__}: {str(e)[:200]}"

        def even():
            y = torch.empty_like(x)
            dist.all_to_all_single(y, x)
            return y

        def uneven():
            y = torch.empty(1 if r == 0 else 3, device=dev, dtype=dtype).repeat(2)
            dist.all_to_all_single(y, x, [1, 1] if r == 0 else [3, 3], [1, 3])
            return y

        def asynchronous():
            y = torch.empty_like(x)
            dist.all_to_all_single(y, x, async_op=True).wait()
            return y

        def gather():
            y = torch.empty(8, device=dev, dtype=dtype)
            dist.all_gather_into_tensor(y, x)
            return y

        base = [2 * r, 2 * r + 1]
        check("all_to_all_single", even, base + [100 + v for v in base])
        check("all_to_all_single uneven", uneven,
              [0, 100] if r == 0 else [1, 2, 3, 101, 102, 103])
        check("all_to_all_single async", asynchronous, base + [100 + v for v in base])
        check("all_gather_into_tensor", gather, [0, 1, 2, 3, 100, 101, 102, 103])
    return out


def _ep_case(case: dict, modes: list[str], rank: int, dev: str) -> dict:
    from multirank.test_ep_modes import euler_sample

    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights
    from dice_ds.modes import by_key
    from dice_ds.parallel.apply import parallelize_dit_moe
    from dice_ds.parallel.dims import ParallelDims
    from dice_ds.parallel.groups import build_groups, local_model_groups
    from dice_ds.parallel.plan import ParallelPlan
    from dice_ds.plan.predict import build_plan
    from dice_ds.workload import Workload

    cfg = get_flavor(case["model"]).replace(**case.get("replace", {}))
    dtype = getattr(torch, case["dtype"])
    n, steps = case["images"], case["steps"]
    g = torch.Generator().manual_seed(4242 + rank)
    z0 = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev, dtype)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g).to(dev)
    res = {"name": case["name"], "modes": {}}
    if case.get("dp_reference"):
        groups1 = local_model_groups()
        dp = init_weights(build_model(cfg, groups1, params_dtype=dtype, device=dev), "random",
                          seed=21, std=case["std"])
        z, _ = euler_sample(dp, parallelize_dit_moe(dp, ParallelPlan(), groups1), z0, y, steps)
        res["dp"] = z.float().cpu().numpy()
        del dp
    groups = build_groups(ParallelDims(2, 2))
    model = init_weights(build_model(cfg, groups, params_dtype=dtype, device=dev), "random",
                         seed=21, std=case["std"])
    for i, key in enumerate(["sync", "sync", *modes]):  # the first sync run warms up, unrecorded
        plan = build_plan(by_key(key).settings, Workload(cfg, images_per_rank=n, steps=steps), 2)
        rt = parallelize_dit_moe(model, plan, groups)
        _sync(dev)
        t0 = time.perf_counter()
        z, _ = euler_sample(model, rt, z0, y, steps)
        _sync(dev)
        seconds = time.perf_counter() - t0
        st = rt.stats()
        rt.detach()
        if i > 0:
            res["modes"][key] = {
                "z": z.float().cpu().numpy(), "seconds": seconds, "flags": " ".join(by_key(key).flags),
                "sync_steps": st["sync_steps"], "remote_bytes": st["a2a_bytes_sent_remote"],
                "rows_sent": st["a2a_rows_sent"], "cache_peak_bytes": st["ep_cache_peak_bytes"],
                "payload_dtype": st["payload_dtype"],
                "phase_seconds": {k: round(v, 5) for k, v in st["phase_seconds"].items()}}
    return res


def _ep_ranks(rank: int, world: int, p: dict) -> dict:
    dev = _device()
    if dev == "cuda":
        torch.cuda.set_device(0)  # both ranks share the one GPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    probe = probe_collectives(dev)
    staged = p["transport"] == "staged" or (
        p["transport"] == "auto" and any(v != "ok" for v in probe.values()))
    if staged:
        stage_collectives(force=p["transport"] == "staged")
    out = {"device": dev, "probe": probe, "staged": staged, "cases": []}
    for case in p["cases"]:
        out["cases"].append(_ep_case(case, p["modes"], rank, dev))
    return out


def _rel(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def ep_modes(p: dict) -> tuple[str, str, dict]:
    import numpy as np
    from distributed import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_ranks(_ep_ranks, 2, tmp, p, timeout=p["timeout"])
    r0 = ranks[0]
    transport = ("gloo, CPU-staged copies of device tensors (gloo refused some collectives on "
                 "them; see probe)" if r0["staged"] else f"gloo on {r0['device']} tensors")
    if p["transport"] == "staged":
        transport = f"gloo, staging forced (rehearsal of the fallback) on {r0['device']} tensors"
    res = {"device": r0["device"], "transport": transport, "probe": r0["probe"], "cases": []}
    problems = []
    for ci, case in enumerate(p["cases"]):
        per_rank = [r["cases"][ci] for r in ranks]
        out = {"name": case["name"], "model": case["model"], "dtype": case["dtype"],
               "images_per_rank": case["images"], "steps": case["steps"],
               "replace": case.get("replace", {}), "modes": {}}
        sync = [c["modes"]["sync"]["z"] for c in per_rank]
        if case.get("dp_reference"):
            rel = max(_rel(s, c["dp"]) for s, c in zip(sync, per_rank))
            out["sync_vs_single_process_rel"] = rel
            out["sync_vs_single_process_bitwise"] = all(
                np.array_equal(s, c["dp"]) for s, c in zip(sync, per_rank))
            if rel > case["sync_tol"]:
                problems.append(f"{case['name']}: sync EP vs single process rel {rel:.1e} > "
                                f"{case['sync_tol']:g}")
        for key in per_rank[0]["modes"]:
            ms = [c["modes"][key] for c in per_rank]
            finite = all(bool(np.isfinite(m["z"]).all()) for m in ms)
            row = {k: v for k, v in ms[0].items() if k != "z"}
            row.update(finite=finite, seconds=max(m["seconds"] for m in ms),
                       remote_bytes=sum(m["remote_bytes"] for m in ms))
            if key != "sync":
                row["rel_to_sync"] = max(_rel(m["z"], s) for m, s in zip(ms, sync))
                if not finite or not row["rel_to_sync"] < case["stale_tol"]:
                    problems.append(f"{case['name']} {key}: finite={finite}, rel to sync "
                                    f"{row['rel_to_sync']:.3g} (bound {case['stale_tol']:g})")
            elif not finite:
                problems.append(f"{case['name']} sync: not finite")
            out["modes"][key] = row
        res["cases"].append(out)
    res["problems"] = problems
    return ("failed" if problems else "ok"), "; ".join(problems), res


# ----------------------------------------------------------------------------- step time
class _Clock:
    def __init__(self, dev: str):
        self.dev = dev

    def __call__(self, fn) -> float:
        if self.dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _interleaved(clock: _Clock, fns: dict, warmup: int, rounds: int) -> dict:
    from dice_ds.bench.interleave import interleaved

    return interleaved(fns, warmup, rounds, clock)


@torch.no_grad()
def _fill(model, seed: int, std: float = 0.02) -> None:
    """Random weights drawn on the model's device (fast at full size; values differ from
    ``init_weights``'s CPU draws, which only the step time does not care about)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            continue
        p.normal_(0.0, std, generator=g)
        if "norm" in name and name.endswith("weight"):
            p.add_(1.0)


@torch.no_grad()
def _copy_weights(src, dst) -> None:
    """Same weights into a model with the other experts implementation."""
    from dice_ds.models.experts import expert_weight_views, is_routed_expert_param

    named = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        if not is_routed_expert_param(name):
            p.copy_(named[name])
    for a, b in zip(src.moe_layers(), dst.moe_layers()):
        for wa, wb in zip(expert_weight_views(a.experts), expert_weight_views(b.experts)):
            for x, y in zip(wa, wb):
                y.copy_(x)


def _param_bytes(model) -> dict:
    from dice_ds.models.experts import is_routed_expert_param

    out = {"expert_weights": 0, "dense_weights": 0}
    for name, p in model.named_parameters():
        key = "expert_weights" if is_routed_expert_param(name) else "dense_weights"
        out[key] += p.numel() * p.element_size()
    return out


def _routed_rows(cfg, rows: int, dev: str, dtype, seed: int):
    """``rows`` tokens routed top-k by a random softmax router, sorted by expert (megatron's call)."""
    g = torch.Generator().manual_seed(seed)
    probs, ids = torch.softmax(torch.randn(rows, cfg.num_experts, generator=g), -1).topk(cfg.top_k)
    ids, probs = ids.reshape(-1), probs.reshape(-1)
    order = torch.argsort(ids, stable=True)
    x = torch.randn(rows, cfg.hidden_size, generator=g).repeat_interleave(cfg.top_k, 0)[order]
    counts = torch.bincount(ids, minlength=cfg.num_experts)
    return x.to(dev, dtype).contiguous(), counts, probs[order].to(dev).contiguous()


def _te_experts(cfg, dev: str, dtype):
    """Transformer Engine's grouped SwiGLU experts (two ``GroupedLinear``), or why not."""
    from importlib.util import find_spec

    if find_spec("transformer_engine") is None:
        return None, "not importable (no transformer_engine module)"
    try:
        import transformer_engine
        import transformer_engine.pytorch as te
    except Exception as e:  # noqa: BLE001 - recorded
        return None, f"not importable: {type(e).__name__}: {str(e)[:200]}"
    if dev != "cuda":
        return None, "importable, but needs CUDA"
    e, h, f = cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size
    fc1 = te.GroupedLinear(e, h, 2 * f, bias=False, params_dtype=dtype, device="cuda")
    fc2 = te.GroupedLinear(e, f, h, bias=False, params_dtype=dtype, device="cuda")

    def forward(x, counts, probs):
        splits = counts.tolist()
        gate, up = fc1(x, splits).chunk(2, dim=-1)
        act = (torch.nn.functional.silu(gate) * up * probs.unsqueeze(-1)).to(x.dtype)
        return fc2(act, splits), None

    return forward, f"transformer_engine {getattr(transformer_engine, '__version__', '?')}"


def _plan(cfg, batch: int, flavor_cfg) -> dict:
    """dice-ds plan's numbers for this model and batch: one GPU (dp), H100 preset, bf16, CFG."""
    from dice_ds.plan.costs import costs_from_flops, layer_flops
    from dice_ds.plan.predict import predict
    from dice_ds.plan.presets import DEVICES, EFFICIENCY, LINKS
    from dice_ds.workload import Workload

    w = Workload(cfg, images_per_rank=batch, cfg_guidance=True, steps=50, dtype="bf16")
    h100 = DEVICES["h100"]
    row = predict("dp", w, costs_from_flops(w, h100.flops), LINKS["nvlink-h100"], 1)
    out = {"device": h100.name, "peak_flops": h100.peak_flops, "efficiency": EFFICIENCY,
           "step_seconds": row["step_seconds"], "memory": row["memory"],
           "flops_per_step": sum(layer_flops(w).values()) * cfg.depth}
    cmd = ["--models", cfg.name, "--gpus", "1", "--scenarios", "h100:nvlink-h100", "--modes",
           "dp,sync", "--batch", str(batch), "--dtype", "bf16"]
    out["command"] = "dice-ds plan " + " ".join(cmd)
    if cfg.replace(experts_impl=flavor_cfg.experts_impl) != flavor_cfg:
        out["cli_check"] = "not run: dice-ds plan has no --depth/--image-size; same functions here"
        return out
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "dice_ds.plan.cli", *cmd, "--out", tmp],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            out["cli_check"] = f"dice-ds plan failed: {proc.stderr[-300:]}"
            return out
        cli = next(r for r in json.load(open(Path(tmp) / "plan.json"))["predictions"]
                   if r["mode"] == "dp")
    same = abs(cli["step_seconds"] - row["step_seconds"]) <= 1e-9 * row["step_seconds"] \
        and cli["memory"] == row["memory"]
    out["cli_check"] = "dice-ds plan's dp row equals these numbers" if same else \
        f"DIFFERS: dice-ds plan says {cli['step_seconds']} s, {cli['memory']}"
    return out


@torch.no_grad()
def step_time(p: dict) -> tuple[str, str, dict]:
    from dice_ds import mcore
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model
    from dice_ds.parallel.groups import init_distributed

    dev = _device()
    mcore.prepare(dev)  # an entry point: version check (CPU patches without CUDA), a 1-rank world
    init_distributed(dev)
    dtype = torch.bfloat16
    flavor = get_flavor(p["model"])
    cfg = flavor.replace(**p.get("replace", {}))
    batch = p["batch"]
    models = {}
    for impl in ("grouped", "sequential"):
        models[impl] = build_model(cfg.replace(experts_impl=impl), params_dtype=dtype, device=dev)
    _fill(models["grouped"], seed=0)
    _copy_weights(models["grouped"], models["sequential"])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    z = z.to(dev, dtype)
    t = torch.full((batch,), 0.5, device=dev)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(dev)
    outs = {k: m.forward_with_cfg(z, t, y, 1.5).float() for k, m in models.items()}
    finite = all(bool(torch.isfinite(o).all()) for o in outs.values())
    rel = ((outs["grouped"] - outs["sequential"]).norm() / outs["sequential"].norm()).item()
    del outs
    clock = _Clock(dev)
    fns = {k: (lambda m=m: m.forward_with_cfg(z, t, y, 1.5)) for k, m in models.items()}
    times = _interleaved(clock, fns, p["warmup"], p["rounds"])
    plan = _plan(cfg, batch, flavor)
    res = {"device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
           "model": cfg.name, "depth": cfg.depth, "input_size": cfg.input_size,
           "tokens_per_image": cfg.num_tokens, "batch": batch, "rows": 2 * batch * cfg.num_tokens,
           "dtype": "bf16", "warmup": p["warmup"], "rounds": p["rounds"], "finite": finite,
           "grouped_vs_sequential_rel": rel, "plan": plan, "impls": {}}
    if dev != "cuda":
        res["note"] = ("CPU rehearsal: the times, memory and efficiencies below are computed the "
                       "same way but compare a CPU with an H100 preset; they mean nothing")
    for impl, m in models.items():
        med = statistics.median(times[impl])
        row = {"step_seconds": med, "step_seconds_all": times[impl],
               "weights": _param_bytes(m), "plan_step_seconds_h100": plan["step_seconds"],
               "measured_over_plan": med / plan["step_seconds"],
               "tflops": plan["flops_per_step"] / med / 1e12,
               "efficiency_to_match": plan["flops_per_step"] / med / plan["peak_flops"]}
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fns[impl]()
            torch.cuda.synchronize()
            transient = torch.cuda.max_memory_allocated() - base
            peak = sum(row["weights"].values()) + transient
            pm = plan["memory"]
            plan_total = pm["expert_weights"] + pm["dense_weights"] + pm["activations"]
            row.update(transient_bytes=transient, peak_bytes=peak, plan_bytes=plan_total,
                       peak_over_plan=peak / plan_total,
                       transient_over_plan_activations=transient / pm["activations"])
        else:
            row["peak_bytes"] = None
            row["memory_note"] = "no CUDA memory statistics on CPU"
        res["impls"][impl] = row
    res["grouped_over_sequential"] = (res["impls"]["grouped"]["step_seconds"]
                                      / res["impls"]["sequential"]["step_seconds"])
    # the routed experts alone: one layer's call, all three implementations where available
    x, counts, probs = _routed_rows(cfg, 2 * batch * cfg.num_tokens, dev, dtype, seed=1)
    experts = {k: m.blocks[0].moe.experts for k, m in models.items()}
    te_fwd, te_why = _te_experts(cfg, dev, dtype)
    if te_fwd is not None:
        experts["transformer_engine"] = te_fwd
    efns = {k: (lambda e=e: e(x, counts, probs)) for k, e in experts.items()}
    etimes = _interleaved(clock, efns, p["warmup"], p["rounds"])
    res["experts_alone"] = {"rows": int(counts.sum()), "transformer_engine": te_why,
                            **{f"{k}_seconds": statistics.median(v) for k, v in etimes.items()}}
    problems = []
    if not finite:
        problems.append("step output not finite")
    if not rel < 2e-2:  # bf16, different GEMM kernels (tests/gpu/test_experts_step_time.py)
        problems.append(f"grouped vs sequential rel {rel:.2e} >= 2e-2")
    return ("failed" if problems else "ok"), "; ".join(problems), res


STEPS = {"machine": machine, "tests": tests, "ep_modes": ep_modes, "step_time": step_time}


def main(argv: list[str]) -> int:
    name, params, result = argv[0], json.loads(Path(argv[1]).read_text()), Path(argv[2])
    t0 = time.perf_counter()
    try:
        status, reason, res = STEPS[name](params)
    except Exception as e:  # noqa: BLE001 - the step's failure is its result
        import traceback

        lines = [x for x in str(e).strip().splitlines() if x.strip()] or [""]
        text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
        status, reason, res = "failed", f"{type(e).__name__}: {text[:500]}", {
            "traceback": traceback.format_exc()[-3000:]}
    result.write_text(json.dumps({"status": status, "reason": reason, "results": res,
                                  "seconds": time.perf_counter() - t0}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
