"""What a checkpoint says about the model, checked on every rank before any process group starts.

Owns the architecture facts read off keys and shapes alone (``inspect_checkpoint``), the run's
``ModelConfig`` fixed by them (``config_for_checkpoint``: E and the attention layout come from the
checkpoint, never from a default -- pitfall 2 -- and depth, hidden size, patch size and heads must
match the chosen ``--model``) and completeness (``expected_keys``, ``check_complete``: every tensor
the model will load is present and consistently shaped: all blocks carry block 0's keys and
shapes, every layer has all E experts, and the non-block tensors exist). All of it reads names and
shapes only, so it runs on ``reader.meta_state_dict()`` (``dice_ds/weights/read.py``); a mismatch
found only when loading into the built model would surface after the process group started, so
this module catches what it can earlier. Also owns a checkpoint's identity: the architecture
dice_ds records in the files it writes (``architecture_metadata``) and ``check_architecture``,
which refuses a file made for another architecture than the run's model (heads included, which
no timm-layout key or shape tells) or another latent size, and lists what it had to assume for
released files that record nothing. Every failure is one ``ConfigError`` line.

Invariants: no process group, no model is built; works on released and dice_ds key layouts
(``dice_ds/weights/keymap.py`` maps the latter's names).
"""

from __future__ import annotations

import math
import re

import torch

from dice_ds.config import FLAVORS, ConfigError, ModelConfig
from dice_ds.weights.keymap import is_dice_layout, mcore_to_released
from dice_ds.weights.read import CheckpointReader, first_line

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
ARCH_PREFIX = "dice_ds."
"""Prefix of the architecture entries in a checkpoint's string metadata (``architecture_metadata``)."""
ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "num_experts", "patch_size", "in_channels",
               "learn_sigma", "attn_layout", "input_size")
"""The ``ModelConfig`` fields a checkpoint records (plus the flavor name), in the order checked."""
REGENERATE_FLAG = "--regenerate-pos-embed"
"""The flag that accepts a checkpoint made for another latent size (its ``pos_embed`` replaced);
the settings tree's ``regenerate_pos_embed`` (``dice_ds/ds_config.py``)."""
REGENERATED = "pos_embed regenerated"
"""How the note of a replaced ``pos_embed`` starts (``check_architecture``'s returned list)."""


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
    """Raise one ConfigError line if a tensor of ``cfg`` is missing, shaped unlike its peers, or
    not floating point (:func:`check_dtypes`)."""
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
    check_dtypes(released, cfg, path)


def check_dtypes(sd: dict, cfg: ModelConfig, path: str) -> None:
    """Raise one ConfigError line if a tensor the model loads is not floating point (an integer or
    bool tensor is never cast into a weight: e.g. a header whose dtype says I32 over F32 bytes)."""
    released = _released_keys(sd)
    bad = [f"{k} is {str(released[k].dtype).replace('torch.', '')}" for k in expected_keys(cfg)
           if k in released and not released[k].dtype.is_floating_point]
    if bad:
        raise ConfigError(f"--ckpt {path}: {len(bad)} non-floating tensor(s) where the model has "
                          f"floating weights ({listed(bad)}); the file's dtypes are wrong (corrupt "
                          "header?) or it is not a DiT-MoE checkpoint: re-export it")


# ----------------------------------------------------------------------------- identity
def architecture_metadata(cfg: ModelConfig) -> dict[str, str]:
    """What a checkpoint of ``cfg`` records about its architecture, as strings (the
    ``.safetensors`` ``__metadata__``; a ``.pt``'s ``__metadata__`` dict entry): the flavor name and
    ``ARCH_FIELDS``, keys prefixed ``dice_ds.``. Written by ``dice_ds/weights/write.py`` and
    ``save.py``; compared by :func:`check_architecture`."""
    meta = {ARCH_PREFIX + "flavor": cfg.name}
    for name in ARCH_FIELDS:
        value = getattr(cfg, name)
        meta[ARCH_PREFIX + name] = str(value).lower() if isinstance(value, bool) else str(value)
    return meta


def recorded_architecture(metadata: dict[str, str], path: str) -> dict | None:
    """The architecture a checkpoint's metadata records (``flavor`` and the ``ARCH_FIELDS`` it
    holds, typed like ``ModelConfig``'s), or None when it records none (released files)."""
    if not any(k.startswith(ARCH_PREFIX) for k in metadata):
        return None
    out = {"flavor": metadata.get(ARCH_PREFIX + "flavor", "?")}
    for name in ARCH_FIELDS:
        text = metadata.get(ARCH_PREFIX + name)
        if text is None:
            continue
        if name == "attn_layout":
            ok, value = text in ("timm", "flash"), text
        elif name == "learn_sigma":
            ok, value = text in ("true", "false"), text == "true"
        else:
            ok, value = text.isdigit(), int(text) if text.isdigit() else None
        if not ok:
            raise ConfigError(f"--ckpt {path}: metadata {ARCH_PREFIX}{name}={text!r:.40} is not a "
                              f"valid {name}; the file's metadata is corrupt: re-export it")
        out[name] = value
    return out


def _fix(name: str, theirs, flavor: str, cfg: ModelConfig) -> str:
    """How the user matches the run's model to a checkpoint made for ``name=theirs``."""
    model = f"--model {flavor} " if flavor != cfg.name and flavor in FLAVORS else ""
    if name == "depth":
        return f"use {model}--depth {theirs} to match it"
    if model:
        return f"use {model.strip()} to match it"
    return (f"no --model flavor has {name}={theirs} ({flavor} was modified when the file was "
            f"written): use a checkpoint made for --model {cfg.name}")


def check_architecture(reader: CheckpointReader, cfg: ModelConfig,
                       regenerate_pos_embed: bool = False) -> list[str]:
    """Refuse, in one ConfigError line naming both values, a checkpoint made for another
    architecture than ``cfg`` (the ``ModelConfig`` the run is about to build: after
    :func:`config_for_checkpoint`, with the run's latent size); return what had to be assumed.

    Files written by dice_ds (``architecture_metadata``) are compared field by field: depth,
    hidden size, heads, experts, patch, in_channels, learn_sigma, attention layout and latent
    size. The latent size is also read off ``pos_embed``'s token count, so released files
    without metadata are checked too: another size is an error unless ``regenerate_pos_embed``
    (the user's ``REGENERATE_FLAG``; the returned list then says so), and that flag with a file of
    the run's size is refused (it would do nothing). Released files cannot tell
    the head count of the timm layout (it is in no key or shape): the flavor's is assumed.

    Returns one sentence per assumption or replacement, for the pipeline to state once in the log
    and in run.json (empty for a dice_ds file that matches). Reads names, shapes and metadata only:
    call before any process group starts (``dice_ds/pipeline/prepare.py``, after
    ``config_for_checkpoint`` and ``check_complete``).
    """
    path = reader.path
    recorded = recorded_architecture(reader.metadata, path)
    notes: list[str] = []
    if recorded is not None:
        flavor = recorded["flavor"]
        for name in ARCH_FIELDS:
            if name == "input_size" or name not in recorded:
                continue
            theirs, ours = recorded[name], getattr(cfg, name)
            if theirs != ours:
                raise ConfigError(f"--ckpt {path}: the checkpoint was made for {name}={theirs} "
                                  f"({flavor}), the run's model has {name}={ours} ({cfg.name}): "
                                  f"{_fix(name, theirs, flavor, cfg)}")
    info = reader.infos.get("pos_embed")
    tokens = info.shape[1] if info is not None and len(info.shape) == 3 else None
    side = None
    if recorded is not None and "input_size" in recorded:
        side = recorded["input_size"]
    elif tokens is not None:
        side = math.isqrt(tokens) * cfg.patch_size
    if side is not None and side != cfg.input_size:
        if not regenerate_pos_embed:
            raise ConfigError(f"--ckpt {path}: the checkpoint was made for input_size={side} (latent "
                              f"side), the run's model has input_size={cfg.input_size}: pass the "
                              f"image size it was made for (--image-size {8 * side} with the SD "
                              f"VAE, {side} with --vae identity), or {REGENERATE_FLAG} to replace "
                              "its pos_embed (outputs then only for performance tests)")
        notes.append(f"{REGENERATED} for input_size={cfg.input_size} (latent side): the "
                     f"checkpoint was made for input_size={side}")
    elif regenerate_pos_embed:
        raise ConfigError(f"{REGENERATE_FLAG}: --ckpt {path} was made for this run's latent size "
                          f"(input_size={cfg.input_size}); nothing to regenerate: drop the flag")
    if recorded is None:
        if cfg.attn_layout == "timm":
            notes.append(f"num_heads={cfg.num_heads} assumed from --model {cfg.name}: a "
                         "timm-layout checkpoint without metadata does not record its head count")
        if side == cfg.input_size and tokens is not None:
            notes.append(f"input_size={side} (latent side) read from pos_embed's {tokens} tokens: "
                         "the checkpoint records no image size")
    return notes
