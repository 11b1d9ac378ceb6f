"""Apply a ``ParallelPlan`` to a built DiT-MoE: ``parallelize_dit_moe(model, plan, groups)``.

Owns the one place where a plan becomes a running configuration (torchtitan's ``parallelize_*``):
the model stays plain single-device code whose MoE layers were built on ``groups`` (EP sharding of
the experts happens at build time, ``dice_ds.models.build_model``); this function checks that the
model, the groups and the plan agree, builds one ``DiceRuntime`` for the model, gives every async
layer a stale dispatcher (displaced or interweaved; megatron's is kept for ``runtime.detach()``) and
attaches the runtime to every MoE layer. Every plan goes through here, DP (ep_size 1) and sync EP
included: then the runtime runs megatron's phases unchanged and only measures. A plan with
``sp_size > 1`` also gets a ``SequenceParallelRuntime`` on the attention layers and the token seam
(``dice_ds.parallel.sp``), on the SP group of ``groups`` (``groups.sp``); the two runtimes are
then returned as one ``RuntimeStack`` (EP runtime first).
"""

from __future__ import annotations

import functools

from dice_ds import mcore
from dice_ds.config import ConfigError
from dice_ds.lifecycle import RuntimeStack
from dice_ds.moe.runtime import DiceRuntime
from dice_ds.parallel.sp import SequenceParallelRuntime


def parallelize_dit_moe(model, plan, groups):
    """Attach a ``DiceRuntime`` running ``plan`` to ``model`` (built on ``groups``, a
    ``ModelGroups`` from ``build_groups``); return it.

    With ``plan.sp_size > 1`` return ``RuntimeStack(dice_runtime, sp_runtime)``.
    """
    layers = model.moe_layers()
    if not layers:
        raise ConfigError("parallelize_dit_moe: the model has no MoE layers")
    if any(getattr(layer, "runtime", None) is not None for layer in layers):
        raise ConfigError("parallelize_dit_moe: the model already has a runtime; call "
                          "runtime.detach() first")
    model_ep = layers[0].token_dispatcher.ep_size
    dims = groups.dims
    if (plan.ep_size, plan.sp_size) != (dims.ep, dims.sp) or plan.ep_size != model_ep:
        raise ConfigError(
            f"ep_size={plan.ep_size} (--ep-size), sp_size={plan.sp_size} (--sp) disagree with the "
            f"process groups (ep {dims.ep}, sp {dims.sp}) or the model (built with EP size "
            f"{model_ep}): build the groups with build_groups(ParallelDims(world, plan.ep_size, "
            "plan.sp_size)) and the model on them")
    plan.validate(world_size=dims.world, num_experts=layers[0].config.num_moe_experts,
                  depth=len(layers), tokens=model.pos_embed.shape[1])
    device = next(model.parameters()).device
    runtime = DiceRuntime(layers, plan, groups, device=device).install(
        functools.partial(mcore.process_groups, groups))
    if not plan.sp_enabled:
        return runtime
    return RuntimeStack(runtime, SequenceParallelRuntime(model, plan, groups.sp).install())
