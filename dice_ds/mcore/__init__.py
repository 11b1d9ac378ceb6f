"""The one boundary between dice_ds and megatron-core: the only package that imports ``megatron``.

Owns everything dice_ds takes from megatron-core (pinned to ``MEGATRON_CORE_VERSION``, checked by
``check_version``), one submodule per concern; each imports megatron at its top, and this
``__init__`` imports none of them, so ``import dice_ds.mcore`` (and ``import dice_ds.models``, which
uses it) imports no megatron. A name below is loaded from its submodule on first access:

- ``transformer_config(cfg, params_dtype, ep_size)`` (``config``): ``ModelConfig`` ->
  ``TransformerConfig``;
- ``DiTMoELayer``, ``moe_submodules``, ``build_moe_layer`` (``layer``): the DiT-MoE FFN on
  ``MoELayer`` and its spec;
- ``GroupedExperts`` (``experts``): all local experts in two grouped GEMMs, a ``MegatronModule``;
- ``process_groups(groups)`` (``groups``): the ``ProcessGroupCollection`` made from
  ``dice_ds.parallel.groups.ModelGroups``;
- ``MoEAlltoAllTokenDispatcher`` (``dispatcher``): megatron's all-to-all dispatcher, the base class
  of ``dice_ds.moe.dispatcher``'s.

Entry points (the CLI's pipeline build ``dice_ds.pipeline.core``, scripts, the tests' fixtures) call
``prepare(device)`` once before building a model: it checks the pinned version and, on a torch
without CUDA, applies the CPU patches of ``patches/megatron_cpu.py``. ``prepared(device)`` says
whether that happened; ``dice_ds.models.build_model`` asserts it and has no side effect itself.
"""

from __future__ import annotations

import importlib

import torch

from dice_ds.mcore.version import MEGATRON_CORE_VERSION, check_version
from dice_ds.patches.megatron_cpu import apply_megatron_cpu_patches, patches_applied

__all__ = ["MEGATRON_CORE_VERSION", "check_version", "prepare", "prepared",
           "transformer_config", "DiTMoELayer", "moe_submodules", "build_moe_layer",
           "GroupedExperts", "process_groups", "MoEAlltoAllTokenDispatcher"]

_LAZY = {
    "transformer_config": "config",
    "DiTMoELayer": "layer", "moe_submodules": "layer", "build_moe_layer": "layer",
    "GroupedExperts": "experts",
    "process_groups": "groups",
    "MoEAlltoAllTokenDispatcher": "dispatcher",
}
_version_checked = False


def __getattr__(name: str):
    """Load a megatron-backed name from its submodule on first access (module docstring)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'dice_ds.mcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dice_ds.mcore.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def _needs_cpu_patches(device: torch.device | str) -> bool:
    return torch.device(device).type != "cuda" and not torch.cuda.is_available()


def prepare(device: torch.device | str = "cpu") -> None:
    """Entry points call this once before building a model: check the pinned megatron-core version;
    for a non-CUDA device on a torch without CUDA, apply ``patches/megatron_cpu.py``. Idempotent."""
    global _version_checked
    check_version()
    _version_checked = True
    if _needs_cpu_patches(device):
        apply_megatron_cpu_patches()


def prepared(device: torch.device | str = "cpu") -> bool:
    """True when ``prepare(device)`` (or an equivalent) ran in this process."""
    return _version_checked and (patches_applied() or not _needs_cpu_patches(device))
