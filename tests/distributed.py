"""Run a function on N gloo ranks in fresh CPU processes: ``run_ranks(fn, world_size, tmp_path)``.

Ranks are forked from a forkserver that has already imported torch, megatron-core (through
``dice_ds.mcore``) and dice_ds, so a rank starts in well under a second. Each rank is prepared like an
entry point: its default group started, then ``dice_ds.mcore.prepare(device)`` (version check, CPU
patches of patches/megatron_cpu.py). Rendezvous is a file store under pytest's ``tmp_path`` (no
ports). A rank that raises makes ``run_ranks`` raise with that rank's traceback; the other ranks are
terminated, never left hanging. ``fn`` must be a module-level function (it is pickled).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import traceback

_PRELOAD = ["torch", "torch.distributed", "dice_ds.mcore.layer", "dice_ds.models",
            "dice_ds.parallel.groups"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def _worker(fn, rank, world_size, store, results, args, device="cpu"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        from dice_ds import mcore
        from dice_ds.parallel.groups import init_distributed

        if device == "cuda":  # one GPU per rank, NCCL
            torch.cuda.set_device(rank)
        init_distributed(device, init_method=f"file://{store}", rank=rank, world_size=world_size)
        mcore.prepare(device)
        out = fn(rank, world_size, *args)
        # serialise here: a tensor put on the queue as-is travels as a file descriptor of this
        # (exiting) process, which the parent may fail to open
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _load(payload: bytes):
    import torch

    return torch.load(io.BytesIO(payload), weights_only=False)


def run_ranks(fn, world_size: int, tmp_path, *args, timeout: float = 240.0,
              device: str = "cpu") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return results by rank.

    Results are serialised with ``torch.save`` in the rank and loaded in the parent (tensors, numpy
    arrays and plain Python values all work). ``device="cuda"``: rank r uses GPU r and the process
    group is NCCL (tests/gpu); the default is CPU ranks on gloo.
    """
    ctx = _context()
    store = os.path.join(str(tmp_path), f"store_{os.getpid()}_{id(fn)}_{world_size}")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, store, results, args, device),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - out.keys())} did not "
                                   f"finish within {timeout}s") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = _load(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world_size)]
