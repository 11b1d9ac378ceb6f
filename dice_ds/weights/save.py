"""A built model's weights out, in the released DiT-MoE layout (what ``dice_ds/weights/read.py``
reads back and the reference code loads).

Owns ``export_released_state_dict(model)`` (the model's tensors under released names, through
``dice_ds/weights/keymap.py``'s ``mcore_to_released``) and ``save_checkpoint(model, path)``
(``{"ema": sd}`` plus the architecture as string metadata for ``.pt``/``.pth``, flat for
``.safetensors`` with the same metadata in its header): how ``scripts/train_digits.py``
wrote the shipped digits model and how tests write small checkpoints. Random checkpoints at real
size, without a model, are ``dice_ds/weights/write.py``.

Invariants: the model must hold every expert (an EP shard is refused, not half-written); parts of
stacked or fused tensors are cloned, so an export shares no storage between keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dice_ds.config import ConfigError
from dice_ds.weights.check import architecture_metadata
from dice_ds.weights.keymap import mcore_to_released
from dice_ds.weights.load import local_expert_ids
from dice_ds.weights.read import METADATA_KEY


def export_released_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under released DiT-MoE keys (the model must hold every expert)."""
    local = local_expert_ids(model)
    if local != tuple(range(model.cfg.num_experts)):
        raise ValueError(f"export needs a model holding all {model.cfg.num_experts} experts; this "
                         f"one holds {list(local)} (gather the EP shards first)")
    sd = mcore_to_released(model.state_dict(), expert_ids=local)
    return {k: (v if dtype is None else v.to(dtype)).detach().contiguous() for k, v in sd.items()}


def save_checkpoint(model, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model in released format: ``{"ema": sd, "__metadata__": meta}`` for
    ``.pt``/``.pth``, flat for ``.safetensors`` with ``meta`` as its header metadata; ``meta``
    records the architecture (``dice_ds/weights/check.py``: ``architecture_metadata``)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise ConfigError(f"checkpoint path {path}: use a .pt or .safetensors extension")
    sd = export_released_state_dict(model, dtype)
    meta = {"format": "pt", **architecture_metadata(model.cfg)}
    if path.suffix == ".safetensors":
        save_file(sd, str(path), metadata=meta)
    else:
        torch.save({"ema": sd, METADATA_KEY: meta}, path)
    return path
