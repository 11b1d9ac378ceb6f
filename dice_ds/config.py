"""Model configuration: the frozen ``ModelConfig`` dataclass and the ``FLAVORS`` registry.

Owns: every architectural number of a DiT-MoE (spec §1.2) and the per-flavor defaults for sampler
and dtype. Building a config is inert (no process group, no device); ``validate()`` raises
``ConfigError`` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


EXPERTS_IMPLS = ("sequential", "grouped")
"""Accepted values of ``ModelConfig.experts_impl``."""


class ConfigError(ValueError):
    """Bad user input, reported before any process group starts."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one DiT-MoE."""

    name: str
    depth: int
    hidden_size: int
    num_heads: int
    num_experts: int = 8
    """Routed experts E. For a checkpoint this is read from ``blocks.0.moe.gate.weight``."""
    top_k: int = 2
    patch_size: int = 2
    in_channels: int = 4
    input_size: int = 32
    """Latent side length (image size / 8 for the SD VAE)."""
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    """Routed expert intermediate size = mlp_ratio * hidden."""
    shared_ratio: float = 2.0
    """Shared expert intermediate size = shared_ratio * hidden (DiT-MoE: n_shared_experts=2)."""
    attn_layout: Literal["timm", "flash"] = "timm"
    """'timm': qkv/proj (S, B). 'flash': Wqkv + affine q_norm/k_norm + out_proj (XL, G)."""
    sampler: Literal["rf", "ddpm"] = "rf"
    """Default sampler of the released checkpoint of this size."""
    experts_impl: Literal["sequential", "grouped"] = "grouped"
    """Routed-expert computation. 'grouped' (default; faster on CPU at S/2 and XL/2 width, see
    ``scripts/bench_experts.py``): ``dice_ds.mcore.experts``, all local experts in two grouped
    GEMMs over stacked weights. 'sequential': megatron's ``SequentialMLP`` (one ``MLP`` per local
    expert). Same outputs (fp32: equal to rounding; measured equal) and the same checkpoint format."""

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def expert_ffn_size(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)

    @property
    def shared_ffn_size(self) -> int:
        return int(self.shared_ratio * self.hidden_size)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"input_size={self.input_size} (latent side) is not a multiple of "
                f"patch_size={self.patch_size}: use an image size that is a multiple of "
                f"{8 * self.patch_size}"
            )
        if self.experts_impl not in EXPERTS_IMPLS:
            raise ConfigError(f"experts_impl={self.experts_impl!r}: choose one of "
                              f"{', '.join(map(repr, EXPERTS_IMPLS))}")
        if self.top_k < 1 or self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if (self.hidden_size // self.num_heads) % 2 or self.hidden_size % 4:
            raise ConfigError(f"hidden_size={self.hidden_size} must be a multiple of 4")
        return self


def _register(registry: dict, cfg: ModelConfig) -> None:
    if cfg.name in registry:
        raise KeyError(f"duplicate model flavor {cfg.name!r}")
    registry[cfg.name] = cfg


FLAVORS: dict[str, ModelConfig] = {}
for _cfg in (
    ModelConfig("debug", depth=2, hidden_size=64, num_heads=4, num_experts=4, input_size=8),
    # the shipped trained model (dice_ds/assets): pixel space (identity "VAE"), 16×16 grayscale digits
    ModelConfig("digits", depth=4, hidden_size=64, num_heads=4, num_experts=8, in_channels=1,
                input_size=16, num_classes=10, learn_sigma=False, attn_layout="flash"),
    ModelConfig("DiT-S/2", depth=12, hidden_size=384, num_heads=6, sampler="ddpm"),
    ModelConfig("DiT-B/2", depth=12, hidden_size=768, num_heads=12, sampler="ddpm"),
    ModelConfig("DiT-XL/2", depth=28, hidden_size=1152, num_heads=16, attn_layout="flash"),
    ModelConfig(
        "DiT-G/2", depth=40, hidden_size=1408, num_heads=16, num_experts=16, attn_layout="flash"
    ),
):
    _register(FLAVORS, _cfg)

_ALIASES = {"S/2": "DiT-S/2", "B/2": "DiT-B/2", "XL/2": "DiT-XL/2", "G/2": "DiT-G/2"}


def get_flavor(name: str) -> ModelConfig:
    """Look up a flavor by name ('DiT-XL/2', 'XL/2', 'debug', ...)."""
    key = _ALIASES.get(name, name)
    if key not in FLAVORS:
        raise ConfigError(
            f"unknown model {name!r} (--model): choose one of {', '.join(FLAVORS)}"
        )
    return FLAVORS[key]
