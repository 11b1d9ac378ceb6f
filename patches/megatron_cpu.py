"""megatron-core 0.16.1 on a CPU-only torch: the only monkeypatches dice_ds applies.

Upstream: megatron-core **0.16.1** exactly, the version dice_ds is pinned to
(``dice_ds.mcore.MEGATRON_CORE_VERSION``): every patched attribute below was read from that
release's source. ``dice_ds.mcore.prepare`` checks the installed version and then calls
:func:`apply_megatron_cpu_patches`.

Applied by one explicit call at the entry points, through ``dice_ds.mcore.prepare(device)``: the
pipeline build (``dice_ds.pipeline.core``, hence the CLI), scripts, and the tests' fixtures
(tests/conftest.py, tests/distributed.py); never by a model constructor (``build_model`` only asserts
that it happened). Importing this module changes nothing and imports no megatron. On a machine where
``torch.cuda.is_available()`` the call is a no-op: a CUDA run uses megatron-core unmodified with
NCCL.

| # | upstream site (0.16.1) | problem without CUDA | why not a subclass | remove when |
|---|---|---|---|---|
| 1 | ``MoEAlltoAllTokenDispatcher.__init__`` creates ``torch.cuda.Stream()`` when the class attribute ``cuda_dtoh_stream`` is None | RuntimeError in the constructor | the stream is created inside ``__init__`` before a subclass could intervene; setting the class attribute to a placeholder is the smallest change | megatron-core guards it on ``torch.cuda.is_available()`` |
| 2 | ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` uses CUDA streams/events; on CPU the split sizes stay tensors, which gloo's ``all_to_all_single`` rejects | RuntimeError / TypeError | the sync dispatcher must be megatron's own class (sync EP = the upstream dispatcher), so the fix must reach that class; our subclasses inherit it | upstream gains a CPU path for the device-to-host step |
| 3 | ``torch.cuda.current_device()`` used as the device of new buffers (router weight move, ``_AllToAll`` output, gather/reduce-scatter buffers, ``GlobalMemoryBuffer``) | "Torch not compiled with CUDA enabled" | the call sites are module-level functions and autograd Functions inside megatron; on a CPU-only torch the original can only raise, so returning ``"cpu"`` changes nothing that worked | upstream passes the input's device instead |
| 4 | ``moe_utils.te_general_gemm`` is referenced though only defined when Transformer Engine imports (0.16.1 bug, fixed in 0.19.2) | NameError in the router gating | module-level name lookup inside an autograd Function | pin moves to >= 0.19.2 |
"""

from __future__ import annotations

import torch

_applied = False


class _NoStream:
    """Placeholder that makes the all-to-all dispatcher skip creating a CUDA stream."""


def _cpu_dtoh_and_synchronize(self, point, tokens_per_expert=None):
    """CPU replacement of the stream-based device-to-host step (patch 2)."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _cpu_current_device():
    return "cpu"


def apply_megatron_cpu_patches() -> bool:
    """Apply patches 1-4 once, only on a torch without CUDA. Returns True if they are in force.

    The caller has checked the megatron-core version (``dice_ds.mcore.prepare`` does)."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()  # 1
    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = (  # 2
        _cpu_dtoh_and_synchronize
    )
    torch.cuda.current_device = _cpu_current_device  # 3
    if not hasattr(moe_utils, "te_general_gemm"):  # 4
        moe_utils.te_general_gemm = None
    _applied = True
    return True


def patches_applied() -> bool:
    """True once :func:`apply_megatron_cpu_patches` has patched this process."""
    return _applied
