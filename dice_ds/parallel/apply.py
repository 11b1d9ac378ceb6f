"""Apply a ``ParallelPlan`` to a built DiT-MoE: ``parallelize_dit_moe(model, plan, groups)``.

Owns the one place where a plan becomes a running configuration (torchtitan's ``parallelize_*``):
the model stays plain single-device code whose MoE layers were built on ``groups`` (EP sharding of
the experts happens at build time, ``dice_ds.models.build_model``); this function checks that the
model, the groups and the plan agree, builds one ``DiceRuntime`` for the model, gives every async
layer a stale dispatcher (displaced or interweaved; megatron's is kept for ``runtime.detach()``) and
attaches the runtime to every MoE layer. Every plan goes through here, DP (ep_size 1) and sync EP
included: then the runtime runs megatron's phases unchanged and only measures.
"""

from __future__ import annotations

from dice_ds.config import ConfigError


def parallelize_dit_moe(model, plan, groups):
    """Attach a ``DiceRuntime`` running ``plan`` to ``model`` (built on ``groups``); return it."""
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
                  depth=len(layers))
    device = next(model.parameters()).device
    runtime = DiceRuntime(layers, plan, groups, device=device)
    return runtime.install(groups.pg_collection)
