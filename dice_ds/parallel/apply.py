"""Apply a ``ParallelPlan`` to a built DiT-MoE: ``parallelize_dit_moe(model, plan, groups)``.

Owns the one place where a plan becomes a running configuration (torchtitan's ``parallelize_*``):
the model stays plain single-device code whose MoE layers were built on ``groups`` (EP sharding of
the experts happens at build time, ``dice_ds.models.build_model``); this function checks that the
model, the groups and the plan agree, builds one ``DiceRuntime`` for the model, gives every async
layer a stale dispatcher (displaced or interweaved; megatron's is kept for ``runtime.detach()``) and
attaches the runtime to every MoE layer. Every plan goes through here, DP (ep_size 1) and sync EP
included: then the runtime runs megatron's phases unchanged and only measures. A plan with
``sp_size > 1`` also gets a ``SequenceParallelRuntime`` on the attention layers and the token seam
(``dice_ds.parallel.sp``), on the SP group passed in (``groups.build_sp_group``); the two runtimes
are then returned as one ``RuntimeStack`` (EP runtime first).
"""

from __future__ import annotations

from dice_ds.config import ConfigError


def parallelize_dit_moe(model, plan, groups, sp_group=None):
    """Attach a ``DiceRuntime`` running ``plan`` to ``model`` (built on ``groups``); return it.

    With ``plan.sp_size > 1`` (``sp_group``: this rank's SP group) return
    ``RuntimeStack(dice_runtime, sp_runtime)``.
    """
    from dice_ds.moe.runtime import DiceRuntime

    layers = model.moe_layers()
    if not layers:
        raise ConfigError("parallelize_dit_moe: the model has no MoE layers")
    if any(getattr(layer, "runtime", None) is not None for layer in layers):
        raise ConfigError("parallelize_dit_moe: the model already has a runtime; call "
                          "runtime.detach() first")
    model_ep = layers[0].token_dispatcher.ep_size
    if plan.ep_size != groups.ep_size or plan.ep_size != model_ep:
        raise ConfigError(
            f"ep_size={plan.ep_size} (--ep-size) disagrees with the process groups (EP size "
            f"{groups.ep_size}) or the model (built with EP size {model_ep}): build the groups "
            "with build_model_groups(plan.ep_size) and the model on them")
    world = groups.ep_size * groups.expt_dp.size()
    plan.validate(world_size=world, num_experts=layers[0].config.num_moe_experts,
                  depth=len(layers), tokens=model.pos_embed.shape[1])
    if plan.sp_enabled and (sp_group is None or sp_group.size() != plan.sp_size):
        raise ConfigError(f"sp_size={plan.sp_size} (--sp) needs this rank's SP group of that size: "
                          "pass sp_group=build_sp_group(plan.ep_size, plan.sp_size)")
    device = next(model.parameters()).device
    runtime = DiceRuntime(layers, plan, groups, device=device).install(groups.pg_collection)
    if not plan.sp_enabled:
        return runtime
    from dice_ds.lifecycle import RuntimeStack
    from dice_ds.parallel.sp import SequenceParallelRuntime

    return RuntimeStack(runtime, SequenceParallelRuntime(model, plan, sp_group).install())
