"""Checks of the input files of a run, made on every rank before any process group starts.

Owns ``read_checkpoint`` (opens ``--ckpt`` for streaming; any failure to read it -- empty,
truncated, garbage, a directory, a ``.safetensors`` with a broken header, a pickle that is not
a state dict -- becomes one ``ConfigError`` line) and ``check_complete`` (every tensor the model
will load is present and consistently shaped: all blocks carry block 0's keys and shapes, every
layer has all E experts, and the non-block tensors exist). Both read names and shapes only.
Shapes against the chosen ``--model`` are checked by
``dice_ds.checkpoint.config_for_checkpoint``; a mismatch found only when loading into the built
model would surface after the process group started, so this module catches what it can earlier.

Invariants: no process group, no model is built; works on released and dice_ds key layouts.
"""

from __future__ import annotations

import re

from dice_ds.config import ConfigError, ModelConfig

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
_MAX_LISTED = 5


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".")[:160] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_checkpoint(path: str):
    """A streaming reader of ``--ckpt`` (``dice_ds.weights.read.open_checkpoint``: names, dtypes
    and shapes now, bytes at load time) with every failure turned into one ConfigError line.
    ``reader.meta_state_dict()`` is what the checks below and ``config_for_checkpoint`` read."""
    import os
    import pickle

    from dice_ds.weights.read import CheckpointFormatError, open_checkpoint

    if os.path.isdir(path):
        raise ConfigError(f"--ckpt {path}: is a directory; pass the checkpoint file (.pt or "
                          ".safetensors)")
    if not os.path.isfile(path):
        raise ConfigError(f"--ckpt {path}: no such file; pass the path of a DiT-MoE .pt or "
                          ".safetensors checkpoint")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"--ckpt {path}: is empty (0 bytes); the file was not written completely")
    kind = "safetensors" if path.endswith(".safetensors") else "torch (.pt)"
    try:
        reader = open_checkpoint(path)
    except CheckpointFormatError as e:
        if str(e).startswith("--ckpt"):
            raise ConfigError(str(e)) from None
        raise ConfigError(f"--ckpt {path}: cannot be read as a {kind} checkpoint ({e}); the file "
                          "is truncated, corrupt or not a checkpoint") from None
    except pickle.UnpicklingError:
        # torch's weights-only unpickler explains itself over many lines
        raise ConfigError(f"--ckpt {path}: cannot be read as a {kind} checkpoint with "
                          "weights_only=True (not a pickle of tensors: corrupt, or another "
                          "format); re-save its state dict as .safetensors or a dict of tensors"
                          ) from None
    except Exception as e:  # noqa: BLE001 - torch/zip/json raise many types for bad files
        raise ConfigError(f"--ckpt {path}: cannot be read as a {kind} checkpoint "
                          f"({_first_line(e)}); the file is truncated, corrupt or not a "
                          "checkpoint") from None
    if not reader.infos:
        raise ConfigError(f"--ckpt {path}: holds no tensors")
    return reader


def _released_keys(sd: dict) -> dict:
    """``sd`` under released key names (dice_ds layout converted; names only matter here)."""
    from dice_ds.keymap import is_dice_layout, mcore_to_released

    if not is_dice_layout(sd):
        return sd
    try:
        return mcore_to_released(sd)
    except Exception as e:  # noqa: BLE001 - a malformed dice_ds layout
        raise ConfigError(f"--ckpt: dice_ds-layout checkpoint is malformed ({_first_line(e)})"
                          ) from None


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
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
                          f"missing key(s): {_listed(missing)}; re-export the checkpoint or pick "
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
        raise ConfigError(f"--ckpt {path}: inconsistent tensor shapes ({_listed(odd)}); the "
                          "checkpoint is corrupt or mixes models")
