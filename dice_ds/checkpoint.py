"""Checkpoints: reading released DiT-MoE files, reading facts off their keys, loading, exporting.

Owns (spec §1.3):

- ``read_state_dict(path)``: a released ``.pt`` in its three forms (raw dict, ``{"ema": sd}``,
  ``{"model": sd}``; ``ema`` preferred) or a ``.safetensors`` file, on CPU, memory-mapped where
  torch allows it, unpickled with ``weights_only=True``.
- ``inspect_checkpoint(sd)`` / ``config_for_checkpoint(flavor, sd)``: architecture facts read from
  keys and shapes alone, so the CLI can fix E and the attention layout before any process group or
  model exists (pitfall 2: E comes from the checkpoint, never from a default).
- ``load_into_model(model, sd)``: released (or dice_ds-layout) weights into a ``DiTMoE`` whose MoE
  layers may hold only this rank's experts; the other experts are dropped before loading.
- ``export_released_state_dict(model)`` / ``save_checkpoint(model, path)``: the inverse, for a model
  that holds every expert.

Invariants: nothing here starts a process group or touches CUDA; a mismatch between checkpoint and
model is one ``CheckpointMismatchError`` (a ``ConfigError``) naming every offending key; the only
key ever loaded non-strictly is ``pos_embed`` at a non-256-px size (pitfall 17), with a warning.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch

from dice_ds.config import ConfigError, ModelConfig
from dice_ds.keymap import is_dice_layout, mcore_to_released
from dice_ds.weights.load import (  # noqa: F401 - re-exported: the loader's public names
    CheckpointMismatchError,
    LoadResult,
    local_expert_ids,
    stream_into_model,
)
from dice_ds.weights.read import (
    CheckpointFormatError,
    CheckpointReader,
    InMemoryReader,
    torch_load,
    unwrap_state_dict,
)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_RELEASED_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.")
_GROUPED_FC1 = "blocks.0.moe.experts.fc1_weight"


# ----------------------------------------------------------------------------- reading
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor state dict stored at ``path`` (``.pt``/``.pth``/``.ckpt`` or ``.safetensors``),
    whole, in memory (tests and tools; a run streams with ``dice_ds.weights.read.open_checkpoint``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ckpt {path}: no such file; pass the path of a DiT-MoE .pt or "
                          ".safetensors checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        try:
            obj = torch_load(str(path), mmap=True)
        except RuntimeError as e:  # torch's legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch_load(str(path), mmap=False)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"--ckpt {path}: cannot be read with weights_only=True ({e}); "
                          "re-save its state dict as .safetensors or a plain dict of tensors"
                          ) from e
    try:
        return unwrap_state_dict(obj, str(path))
    except CheckpointFormatError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- inspection
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


# ----------------------------------------------------------------------------- loading
def trim_experts(sd: dict[str, torch.Tensor], keep: tuple[int, ...] | range,
                 ) -> tuple[dict[str, torch.Tensor], int]:
    """Released ``sd`` without the ``.experts.{e}.`` entries of experts not in ``keep``.

    Returns (trimmed dict, number of dropped tensors). Pure: no process group involved.
    """
    keep_set = set(keep)
    out, dropped = {}, 0
    for key, value in sd.items():
        m = _RELEASED_EXPERT.match(key)
        if m and int(m.group(2)) not in keep_set:
            dropped += 1
            continue
        out[key] = value
    return out, dropped


def _is_dice_layout(sd: dict) -> bool:
    return is_dice_layout(sd)


def load_into_model(model, sd: dict[str, torch.Tensor] | CheckpointReader, strict: bool = True,
                    progress: bool = False) -> LoadResult:
    """Load ``sd`` (a state dict or a ``dice_ds.weights.read`` reader; released or dice_ds layout)
    into ``model`` (a materialised ``DiTMoE``), in place, tensor by tensor.

    Each MoE layer receives only the experts in its ``local_expert_indices``; the others are never
    read. Any missing or unexpected key (``strict``) or shape mismatch raises a
    ``CheckpointMismatchError`` listing them, before anything is copied. A ``pos_embed`` for another
    image size is replaced by the model's own table, with a warning
    (``dice_ds/weights/load.py``).
    """
    reader = sd if isinstance(sd, CheckpointReader) else InMemoryReader(sd)
    return stream_into_model(model, reader, strict=strict, progress=progress)


# ----------------------------------------------------------------------------- exporting
def export_released_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under released DiT-MoE keys (the model must hold every expert)."""
    local = local_expert_ids(model)
    if local != tuple(range(model.cfg.num_experts)):
        raise ValueError(f"export needs a model holding all {model.cfg.num_experts} experts; this "
                         f"one holds {list(local)} (gather the EP shards first)")
    sd = mcore_to_released(model.state_dict(), expert_ids=local)
    return {k: (v if dtype is None else v.to(dtype)).detach().contiguous() for k, v in sd.items()}


def save_checkpoint(model, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model in released format: ``{"ema": sd}`` for ``.pt``, flat for ``.safetensors``."""
    path = Path(path)
    sd = export_released_state_dict(model, dtype)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif path.suffix in (".pt", ".pth"):
        torch.save({"ema": sd}, path)
    else:
        raise ConfigError(f"checkpoint path {path}: use a .pt or .safetensors extension")
    return path
