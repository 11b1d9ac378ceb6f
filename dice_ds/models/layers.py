"""Dense DiT building blocks: embeddings, the two attention layouts, adaLN helpers, final layer.

Owns the parts of DiT-MoE that are not the MoE FFN (spec §1.1). Parameter names match the released
DiT-MoE state dicts (spec §1.3), so those keys load without renaming.

Shape legend: N batch, T tokens, D hidden, H heads, K head dim, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x_NTD: torch.Tensor, shift_ND: torch.Tensor, scale_ND: torch.Tensor) -> torch.Tensor:
    return x_NTD * (1 + scale_ND.unsqueeze(1)) + shift_ND.unsqueeze(1)


# ----------------------------------------------------------------------------- positions
def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[len(pos), dim]: sin of pos·ω in the first half, cos in the second, ω_j = 10000^(-2j/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D table, tokens row-major; first half encodes the column, second the row."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return table.float()


# ----------------------------------------------------------------------------- embedders
class PatchEmbed(nn.Module):
    """Conv patchify: [N, C, S, S] -> [N, T, D]."""

    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t laid out [cos, sin] (256 of them), then an MLP."""

    freq_dim = 256

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def features(t_N: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_N.device) / half
        )
        args = t_N.float().unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        feats = self.features(t_N, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index num_classes) for the CFG null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y_N: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y_N)


# ----------------------------------------------------------------------------- attention
def _split_heads(qkv_NT3D: torch.Tensor, heads: int):
    n, t, _ = qkv_NT3D.shape
    qkv = qkv_NT3D.view(n, t, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, N, H, T, K]
    return qkv[0], qkv[1], qkv[2]


def _merge_heads(o_NHTK: torch.Tensor) -> torch.Tensor:
    n, h, t, k = o_NHTK.shape
    return o_NHTK.transpose(1, 2).reshape(n, t, h * k)


def _attend(attn: nn.Module, x_NTD: torch.Tensor) -> torch.Tensor:
    """Q, K, V of ``x``; a sequence-parallel runtime attached as ``attn.runtime`` turns the local
    K/V [N, H, T_local, K] into the full-length K/V it attends to (the seam of
    ``dice_ds.parallel.sp``); then SDPA and the output projection."""
    q, k, v = attn.qkv_heads(x_NTD)
    if attn.runtime is not None:
        k, v = attn.runtime.attention_kv(attn, k, v)
    return attn.out(F.scaled_dot_product_attention(q, k, v))


class TimmAttention(nn.Module):
    """S/B layout: ``qkv`` (bias) and ``proj``; no qk-norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.runtime = None  # set by dice_ds.parallel.sp (sequence parallelism)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def qkv_heads(self, x_NTD: torch.Tensor):
        return _split_heads(self.qkv(x_NTD), self.heads)

    def out(self, o_NHTK: torch.Tensor) -> torch.Tensor:
        return self.proj(_merge_heads(o_NHTK))

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        return _attend(self, x_NTD)


class FlashLayoutAttention(nn.Module):
    """XL/G layout: ``Wqkv`` (bias), per-head affine ``q_norm``/``k_norm`` (eps 1e-6), ``out_proj``.

    The reference runs flash-attn in fp16; here attention is SDPA in the model's dtype.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.runtime = None  # set by dice_ds.parallel.sp (sequence parallelism)
        hd = dim // heads
        self.Wqkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(hd, elementwise_affine=True, eps=1e-6)
        self.k_norm = nn.LayerNorm(hd, elementwise_affine=True, eps=1e-6)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def qkv_heads(self, x_NTD: torch.Tensor):
        q, k, v = _split_heads(self.Wqkv(x_NTD), self.heads)
        return self.q_norm(q), self.k_norm(k), v

    def out(self, o_NHTK: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_merge_heads(o_NHTK))

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        return _attend(self, x_NTD)


ATTENTION_LAYOUTS = {"timm": TimmAttention, "flash": FlashLayoutAttention}


# ----------------------------------------------------------------------------- final layer
class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear(D, p*p*C_out)."""

    def __init__(self, dim: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x_NTD: torch.Tensor, c_ND: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_ND).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x_NTD), shift, scale))


def unpatchify(x_NTP: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """[N, T, p*p*C] -> [N, C, S, S] with tokens row-major."""
    n, t, _ = x_NTP.shape
    side = int(round(math.sqrt(t)))
    x = x_NTP.reshape(n, side, side, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, side * patch, side * patch)
