"""DeepSpeed 0.19.8 on a CPU-only torch: the only monkeypatch dice_ds applies to DeepSpeed.

Upstream: deepspeed **0.19.8** exactly (checked by :func:`apply_deepspeed_cpu_patches`; any other
version raises, because the patched attribute below was read from that release's source).

dice_ds uses DeepSpeed only for its expert / expert-data-parallel group construction
(``deepspeed.utils.groups._create_expert_and_data_parallel``), which asserts that
``deepspeed.comm.init_distributed`` ran. On the CPU accelerator that call constructs a
``TorchBackend`` whose ``__init__`` JIT-compiles ``deepspeed_shm_comm`` (a C++ shared-memory
all-reduce) with g++ and ninja: 31–37 s on first use (docs/megatron-cpu.md §5). dice_ds never calls
DeepSpeed's collectives (every collective goes through ``torch.distributed`` on the groups DeepSpeed
created), so the op is never needed.

Applied by one explicit call, :func:`apply_deepspeed_cpu_patches`, made by
``dice_ds.parallel.groups`` right before it starts DeepSpeed's communication backend. Importing this
module changes nothing (it does not even import DeepSpeed). On a machine where
``torch.cuda.is_available()`` the call only checks the version: the CUDA accelerator has no shm op.

| # | upstream site (0.19.8) | problem without CUDA | why not a subclass | remove when |
|---|---|---|---|---|
| 1 | ``deepspeed.comm.torch.build_shm_op``, called by ``TorchBackend.__init__`` (through ``deepspeed.comm.init_distributed``) | a 31–37 s g++/ninja JIT build of ``deepspeed_shm_comm`` on the first run of every fresh machine, for an op dice_ds never calls | ``init_distributed`` constructs ``TorchBackend`` itself and stores it in the module global ``cdb``; there is no hook to pass another class. The function must be replaced through ``sys.modules["deepspeed.comm.torch"]``, because ``deepspeed.comm`` re-exports ``torch`` as its attribute ``torch`` (``import deepspeed.comm.torch`` binds the real torch) | DeepSpeed builds the op lazily, on the first shm all-reduce |
"""

from __future__ import annotations

import importlib.metadata
import sys

import torch

DEEPSPEED_VERSION = "0.19.8"

_applied = False


def _no_shm_op():
    """Replacement of ``build_shm_op``: no shared-memory op; DeepSpeed then uses torch collectives."""
    return None


def check_deepspeed_version() -> str:
    """Return the installed DeepSpeed version; raise if it is not the pinned one."""
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            f"deepspeed is not installed; use group_backend='torch' or install "
            f"deepspeed=={DEEPSPEED_VERSION} (DS_BUILD_OPS=0 pip install -e .)"
        ) from e
    if version != DEEPSPEED_VERSION:
        raise RuntimeError(
            f"dice_ds's DeepSpeed patch was written against deepspeed=={DEEPSPEED_VERSION} but "
            f"{version} is installed; install the pinned version or use group_backend='torch'"
        )
    return version


def apply_deepspeed_cpu_patches() -> bool:
    """Stub DeepSpeed's shm-op JIT build on a CPU-only torch. Idempotent.

    Must run before the first ``deepspeed.comm.init_distributed`` of the process. Returns True when
    the patch is in place, False on a CUDA machine (nothing patched).
    """
    global _applied
    check_deepspeed_version()
    if torch.cuda.is_available():
        return False
    if not _applied:
        import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch into sys.modules)

        sys.modules["deepspeed.comm.torch"].build_shm_op = _no_shm_op
        _applied = True
    return True
