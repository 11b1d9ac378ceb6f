"""What a checkpoint says about the model, checked on every rank before any process group starts.

Owns the architecture facts read off keys and shapes alone (``inspect_checkpoint``), the run's
``ModelConfig`` fixed by them (``config_for_checkpoint``: E and the attention layout come from the
checkpoint, never from a default -- pitfall 2 -- and depth, hidden size, patch size and heads must
match the chosen ``--model``) and completeness (``expected_keys``, ``check_complete``: every tensor
the model will load is present and consistently shaped: all blocks carry block 0's keys and
shapes, every layer has all E experts, and the non-block tensors exist). All of it reads names and
shapes only, so it runs on ``reader.meta_state_dict()`` (``dice_ds/weights/read.py``); a mismatch
found only when loading into the built model would surface after the process group started, so
this module catches what it can earlier. Every failure is one ``ConfigError`` line.

Invariants: no process group, no model is built; works on released and dice_ds key layouts
(``dice_ds/weights/keymap.py`` maps the latter's names).
"""

from __future__ import annotations

import math
import re

import torch

from dice_ds.config import ConfigError, ModelConfig
from dice_ds.weights.keymap import is_dice_layout, mcore_to_released
from dice_ds.weights.read import first_line

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_GROUPED_FC1 = "blocks.0.moe.experts.fc1_weight"
_TOP_KEYS = (
    "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight", "pos_embed", "final_layer.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight", "final_layer.linear.bias",
)
_ATTN_KEYS = {
    "timm": ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"),
    "flash": ("attn.Wqkv.weight", "attn.Wqkv.bias", "attn.out_proj.weight", "attn.out_proj.bias",
              "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias"),
}
_PROJ = ("gate_proj", "up_proj", "down_proj")
_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.")
_MAX_LISTED = 8


# ----------------------------------------------------------------------------- facts
def _shape(sd: dict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"--ckpt: not a DiT-MoE state dict (no key {key!r})")
    return tuple(sd[key].shape)


def _first_key(sd: dict, *keys: str) -> str:
    for key in keys:
        if key in sd:
            return key
    raise ConfigError(f"--ckpt: not a DiT-MoE state dict (none of {', '.join(keys)})")


def inspect_checkpoint(sd: dict[str, torch.Tensor]) -> dict:
    """Architecture facts readable from keys and shapes (released or dice_ds layout).

    Returns num_experts, depth, hidden_size, attn_layout ('flash' iff a key ends in
    ``attn.Wqkv.weight``), head_dim (flash only, else None), patch_size, in_channels, num_classes,
    input_size (latent side, from the ``pos_embed`` token count), learn_sigma, out_channels,
    expert_ffn_size, shared_ffn_size.
    """
    hidden, in_ch, patch, _ = _shape(sd, "x_embedder.proj.weight")
    depth_ids = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    if not depth_ids or depth_ids != set(range(max(depth_ids) + 1)):
        raise ConfigError(f"--ckpt: block indices are not 0..depth-1: {sorted(depth_ids)[:10]}")
    flash = any(k.endswith("attn.Wqkv.weight") for k in sd)
    gate = _first_key(sd, "blocks.0.moe.gate.weight", "blocks.0.moe.router.weight")
    released = gate.endswith("gate.weight")
    if released:
        expert_ffn = _shape(sd, "blocks.0.moe.experts.0.gate_proj.weight")[0]
        shared_ffn = _shape(sd, "blocks.0.moe.shared_experts.gate_proj.weight")[0]
    elif _GROUPED_FC1 in sd:  # dice_ds grouped layout: fc1_weight [L, 2F, D]
        expert_ffn = _shape(sd, _GROUPED_FC1)[1] // 2
        shared_ffn = _shape(sd, "blocks.0.moe.shared_experts.linear_fc1.weight")[0] // 2
    else:  # dice_ds layout: linear_fc1 = cat(gate, up)
        expert_ffn = _shape(sd, "blocks.0.moe.experts.local_experts.0.linear_fc1.weight")[0] // 2
        shared_ffn = _shape(sd, "blocks.0.moe.shared_experts.linear_fc1.weight")[0] // 2
    tokens = _shape(sd, "pos_embed")[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ConfigError(f"--ckpt: pos_embed has {tokens} tokens, not a square grid")
    out_features = _shape(sd, "final_layer.linear.weight")[0]
    if out_features not in (patch * patch * in_ch, 2 * patch * patch * in_ch):
        raise ConfigError(f"--ckpt: final_layer.linear has {out_features} outputs; expected "
                          f"{patch * patch * in_ch} or {2 * patch * patch * in_ch}")
    return {
        "num_experts": _shape(sd, gate)[0],
        "depth": max(depth_ids) + 1,
        "hidden_size": hidden,
        "attn_layout": "flash" if flash else "timm",
        "head_dim": _shape(sd, "blocks.0.attn.q_norm.weight")[0] if flash else None,
        "patch_size": patch,
        "in_channels": in_ch,
        "num_classes": _shape(sd, "y_embedder.embedding_table.weight")[0] - 1,
        "input_size": grid * patch,
        "learn_sigma": out_features == 2 * patch * patch * in_ch,
        "out_channels": out_features // (patch * patch),
        "expert_ffn_size": expert_ffn,
        "shared_ffn_size": shared_ffn,
    }


def config_for_checkpoint(flavor: ModelConfig, sd: dict[str, torch.Tensor],
                          num_experts: int | None = None) -> ModelConfig:
    """``flavor`` updated with what the checkpoint fixes (E, attention layout, FFN sizes, ...).

    ``num_experts`` is the user's explicit ``--num-experts`` (None if not given); it must agree with
    the checkpoint. Depth, hidden size, patch size and (flash layout) head count must match the
    chosen ``--model``. The latent size stays the flavor's (the image size is a run choice; see
    :func:`load_into_model` for other sizes). Call before any process group starts.
    """
    facts = inspect_checkpoint(sd)
    e = facts["num_experts"]
    if num_experts is not None and num_experts != e:
        raise ConfigError(f"--num-experts {num_experts} but the checkpoint has {e} experts; "
                          "drop the flag")
    if facts["depth"] != flavor.depth:
        raise ConfigError(f"--model {flavor.name} has depth={flavor.depth} but the checkpoint has "
                          f"depth={facts['depth']}: pick the --model that matches --ckpt (or "
                          f"--depth {facts['depth']} for a reduced-depth variant)")
    for name in ("hidden_size", "patch_size"):
        if facts[name] != getattr(flavor, name):
            raise ConfigError(f"--model {flavor.name} has {name}={getattr(flavor, name)} but the "
                              f"checkpoint has {name}={facts[name]}: pick the --model that matches "
                              "--ckpt")
    heads = flavor.num_heads
    if facts["head_dim"] is not None:
        heads = facts["hidden_size"] // facts["head_dim"]
        if heads != flavor.num_heads:
            raise ConfigError(f"--model {flavor.name} has {flavor.num_heads} heads but the "
                              f"checkpoint's q_norm implies {heads}: pick the matching --model")
    cfg = flavor.replace(
        num_experts=e, attn_layout=facts["attn_layout"], in_channels=facts["in_channels"],
        num_classes=facts["num_classes"], learn_sigma=facts["learn_sigma"],
        mlp_ratio=facts["expert_ffn_size"] / facts["hidden_size"],
        shared_ratio=facts["shared_ffn_size"] / facts["hidden_size"],
    )
    if (cfg.expert_ffn_size, cfg.shared_ffn_size) != (facts["expert_ffn_size"],
                                                      facts["shared_ffn_size"]):
        raise ConfigError(f"--ckpt: FFN sizes {facts['expert_ffn_size']}/{facts['shared_ffn_size']} "
                          f"are not representable for hidden {facts['hidden_size']}")
    return cfg.validate()


def _released_keys(sd: dict) -> dict:
    """``sd`` under released key names (dice_ds layout converted; names only matter here)."""
    if not is_dice_layout(sd):
        return sd
    try:
        return mcore_to_released(sd)
    except Exception as e:  # noqa: BLE001 - a malformed dice_ds layout
        raise ConfigError(f"--ckpt: dice_ds-layout checkpoint is malformed ({first_line(e)})"
                          ) from None


def listed(keys: list[str]) -> str:
    """The first few of ``keys`` and how many more: the key list of a one-line error."""
    more = f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def expected_keys(cfg: ModelConfig) -> list[str]:
    """The released-layout keys a complete checkpoint of ``cfg`` holds."""
    keys = list(_TOP_KEYS)
    for b in range(cfg.depth):
        p = f"blocks.{b}."
        keys += [p + "adaLN_modulation.1.weight", p + "adaLN_modulation.1.bias", p + "moe.gate.weight"]
        keys += [p + k for k in _ATTN_KEYS[cfg.attn_layout]]
        keys += [f"{p}moe.shared_experts.{w}.weight" for w in _PROJ]
        keys += [f"{p}moe.experts.{e}.{w}.weight" for e in range(cfg.num_experts) for w in _PROJ]
    return keys


def check_complete(sd: dict, cfg: ModelConfig, path: str) -> None:
    """Raise one ConfigError line if a tensor of ``cfg`` is missing or shaped unlike its peers."""
    released = _released_keys(sd)
    missing = [k for k in expected_keys(cfg) if k not in released]
    if missing:
        raise ConfigError(f"--ckpt {path}: incomplete for --model {cfg.name}: {len(missing)} "
                          f"missing key(s): {listed(missing)}; re-export the checkpoint or pick "
                          "the --model it was trained as")
    odd = []
    for key, value in released.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if not m or not hasattr(value, "shape"):
            continue
        ref = _EXPERT.sub(r"blocks.0.moe.experts.0.", "blocks.0." + m.group(2))
        if ref in released and tuple(released[ref].shape) != tuple(value.shape):
            odd.append(f"{key} {list(value.shape)} vs {ref} {list(released[ref].shape)}")
    if odd:
        raise ConfigError(f"--ckpt {path}: inconsistent tensor shapes ({listed(odd)}); the "
                          "checkpoint is corrupt or mixes models")
