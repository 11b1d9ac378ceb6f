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

import argparse
import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dice_ds.config import ConfigError, ModelConfig
from dice_ds.keymap import mcore_to_released, released_to_mcore

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_RELEASED_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.")
_MCORE_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.local_experts\.(\d+)\.")
_GROUPED_FC1 = "blocks.0.moe.experts.fc1_weight"
_EXTRA = "._extra_state"
_MAX_LISTED = 8


class CheckpointMismatchError(ConfigError):
    """The checkpoint's keys or shapes do not fit the model that was built."""


# ----------------------------------------------------------------------------- reading
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor state dict stored at ``path`` (``.pt``/``.pth``/``.ckpt`` or ``.safetensors``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ckpt {path}: no such file; pass the path of a DiT-MoE .pt or "
                          ".safetensors checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"--ckpt {path}: not a state dict (expected a dict of tensors, "
                          "or one under 'ema' or 'model')")
    return obj


def _torch_load(path: Path):
    """torch.load on CPU, weights only (argparse.Namespace allowed: training scripts store args)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:  # torch's legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(f"--ckpt {path}: cannot be read with weights_only=True ({e}); "
                              "re-save its state dict as .safetensors or a plain dict of tensors"
                              ) from e


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
    for name in ("depth", "hidden_size", "patch_size"):
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
@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_into_model` did besides copying matching tensors."""

    local_experts: tuple[int, ...]
    """Global ids of the experts this model holds (per MoE layer, in local order)."""
    dropped_expert_keys: int = 0
    """Released expert tensors not loaded because another EP rank owns them."""
    regenerated_pos_embed: bool = False
    missing: tuple[str, ...] = field(default_factory=tuple)
    unexpected: tuple[str, ...] = field(default_factory=tuple)
    """Only non-empty with ``strict=False``."""


def local_expert_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """Global ids of the experts held by every MoE layer of ``model`` (identical for all layers)."""
    ids = {tuple(int(i) for i in moe.local_expert_indices) for moe in model.moe_layers()}
    if len(ids) != 1:
        raise ValueError(f"MoE layers hold different expert sets: {sorted(ids)}")
    return ids.pop()


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
    return any(k.endswith(".moe.router.weight") or ".experts.local_experts." in k
               or k.endswith(".moe.experts.fc1_weight") for k in sd)


def _dice_experts_held(sd: dict) -> int:
    """Experts per layer in a dice_ds-layout ``sd`` (either experts layout)."""
    if _GROUPED_FC1 in sd:
        return sd[_GROUPED_FC1].shape[0]
    return len({int(m.group(2)) for k in sd if (m := _MCORE_EXPERT.match(k))})


def _to_model_keys(model, sd: dict, local: tuple[int, ...]) -> tuple[dict, int]:
    """Map ``sd`` (released or dice_ds layout) to the model's keys for experts ``local``.

    Every path goes through the released layout (``dice_ds/keymap.py``), so a file written by either
    experts implementation loads into either.
    """
    if _is_dice_layout(sd):
        shard = len(local) < model.cfg.num_experts and _dice_experts_held(sd) == len(local)
        # a shard holds this rank's experts in local order (the caller saved its own state dict)
        sd = mcore_to_released(sd, expert_ids=local if shard else None)
    n_experts = model.cfg.num_experts
    extra = sorted({k for k in sd if (m := _RELEASED_EXPERT.match(k)) and int(m.group(2)) >= n_experts})
    trimmed, dropped = trim_experts(sd, local)
    try:
        mapped = released_to_mcore(trimmed, local_experts=local,
                                   experts_layout=model.cfg.experts_impl)
    except KeyError as e:
        raise CheckpointMismatchError(f"checkpoint does not match --model {model.cfg.name} (check "
                                      f"--ckpt and --model): {e.args[0]}") from None
    for k in extra:  # experts beyond E would otherwise vanish silently in the trimming
        mapped[k] = sd[k]
    return mapped, dropped - len(extra)


def _listed(keys: list[str]) -> str:
    more = f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _check_keys(model_sd: dict, sd: dict, strict: bool, name: str) -> tuple[list[str], list[str]]:
    """Raise one error naming every missing / unexpected / wrongly shaped key (extra_state aside)."""
    expected = {k for k in model_sd if not k.endswith(_EXTRA)}
    given = {k for k in sd if not k.endswith(_EXTRA)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    shapes = [f"{k}: ckpt {list(sd[k].shape)} vs model {list(model_sd[k].shape)}"
              for k in sorted(expected & given) if sd[k].shape != model_sd[k].shape]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing: {_listed(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listed(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch: {_listed(shapes)}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint does not match --model {name} (check --ckpt and "
                                      f"--model): " + "; ".join(problems))
    return missing, unexpected


def _pos_embed_differs(model, sd: dict) -> bool:
    """True if the checkpoint's pos_embed is for another token count (same hidden size)."""
    if "pos_embed" not in sd:
        return False
    ours, theirs = model.pos_embed.shape, sd["pos_embed"].shape
    return len(theirs) == 3 and theirs[2] == ours[2] and theirs[1] != ours[1]


@torch.no_grad()
def _regenerate_pos_embed(model) -> None:
    from dice_ds.models.layers import sincos_pos_embed_2d

    grid = model.cfg.input_size // model.cfg.patch_size
    table = sincos_pos_embed_2d(model.cfg.hidden_size, grid).unsqueeze(0)
    model.pos_embed.copy_(table.to(model.pos_embed.dtype))


def load_into_model(model, sd: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Load ``sd`` (released or dice_ds layout) into ``model`` (a ``DiTMoE``), in place.

    Each MoE layer receives only the experts in its ``local_expert_indices``; the others are dropped
    before loading. megatron's ``_extra_state`` entries are filled from the model. Any missing or
    unexpected key (``strict``) or shape mismatch raises a ``CheckpointMismatchError`` listing them.
    A ``pos_embed`` for another image size is replaced by the model's own table, with a warning.
    """
    local = local_expert_ids(model)
    mapped, dropped = _to_model_keys(model, sd, local)
    model_sd = model.state_dict()
    regenerate = _pos_embed_differs(model, mapped)
    if regenerate:
        theirs = mapped.pop("pos_embed").shape[1]
        warnings.warn(f"checkpoint pos_embed has {theirs} tokens, the model {model.cfg.num_tokens} "
                      "(another image size): pos_embed regenerated; the weights were trained at the "
                      "checkpoint's size, so outputs are for performance testing only", stacklevel=2)
        mapped["pos_embed"] = model_sd["pos_embed"]
    missing, unexpected = _check_keys(model_sd, mapped, strict, model.cfg.name)
    for key, value in model_sd.items():
        if key.endswith(_EXTRA):
            mapped.setdefault(key, value)
    for key in unexpected:
        mapped.pop(key)
    model.load_state_dict(mapped, strict=strict)
    if regenerate:
        _regenerate_pos_embed(model)
    if missing or unexpected:
        warnings.warn(f"non-strict checkpoint load: {len(missing)} missing "
                      f"({_listed(missing)}), {len(unexpected)} unexpected ({_listed(unexpected)})",
                      stacklevel=2)
    return LoadResult(local_experts=local, dropped_expert_keys=dropped,
                      regenerated_pos_embed=regenerate, missing=tuple(missing),
                      unexpected=tuple(unexpected))


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
