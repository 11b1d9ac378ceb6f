"""Test oracle: a plain-PyTorch DiT-MoE written straight from docs/spec.md §1.1, independent of dice_ds.

Owns ``OracleDiTMoE`` (parameter names are the released DiT-MoE state-dict keys of spec §1.3, both
attention layouts), ``ORACLE_SIZES`` (spec §1.2 numbers, restated here on purpose) and
``randomize_(model, seed)`` (weights that make every path, adaLN gates included, non-trivial).

It imports nothing from dice_ds, so an error shared by dice_ds's modules cannot hide in it. It is
written for clarity, not speed: explicit softmax attention, and the single-device ``moe_infer``
gather / compute / scatter-add over experts sorted by id.

Shape legend: N batch, T tokens, D hidden, H heads, K head dim, E experts, A = N*T*top_k
assignments, C channels, S latent side, P = p*p*C_out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OracleConfig:
    depth: int
    hidden: int
    heads: int
    experts: int
    flash: bool = False
    patch: int = 2
    in_channels: int = 4
    input_size: int = 32
    num_classes: int = 1000
    learn_sigma: bool = True
    top_k: int = 2


ORACLE_SIZES = {
    "debug": OracleConfig(depth=2, hidden=64, heads=4, experts=4, input_size=8),
    "DiT-S/2": OracleConfig(depth=12, hidden=384, heads=6, experts=8),
    "DiT-B/2": OracleConfig(depth=12, hidden=768, heads=12, experts=8),
    "DiT-XL/2": OracleConfig(depth=28, hidden=1152, heads=16, experts=8, flash=True),
    "DiT-G/2": OracleConfig(depth=40, hidden=1408, heads=16, experts=16, flash=True),
}


def sincos_table(hidden: int, grid: int) -> torch.Tensor:
    """[grid*grid, hidden] MAE 2-D table: first half encodes the column index, second the row.

    Each half: [sin(pos·ω), cos(pos·ω)] with ω_j = 1 / 10000^(j / (hidden/4)), in float64.
    """
    quarter = hidden // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")

    def axis(pos):
        ang = pos.reshape(-1, 1) * omega
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([axis(xs), axis(ys)], dim=1).float()


def modulate(x_NTD, shift_ND, scale_ND):
    return x_NTD * (1 + scale_ND[:, None, :]) + shift_ND[:, None, :]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freqs: int = 256):
        super().__init__()
        self.freqs = freqs
        self.mlp = nn.Sequential(nn.Linear(freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t_N):
        half = self.freqs // 2
        f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = t_N.float()[:, None] * f[None, :]
        return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], dim=1))


class LabelEmbedder(nn.Module):
    def __init__(self, classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(classes + 1, hidden)  # row `classes` = null class

    def forward(self, y_N):
        return self.embedding_table(y_N)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def _attention(q_NHTK, k_NHTK, v_NHTK):
    w = (q_NHTK @ k_NHTK.transpose(-1, -2)) / math.sqrt(q_NHTK.shape[-1])
    return w.softmax(dim=-1) @ v_NHTK


class TimmAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x_NTD):
        n, t, d = x_NTD.shape
        qkv = self.qkv(x_NTD).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o_NHTK = _attention(qkv[0], qkv[1], qkv[2])
        return self.proj(o_NHTK.transpose(1, 2).reshape(n, t, d))


class FlashAttention(nn.Module):
    """XL/G layout: Wqkv, per-head affine LayerNorm on q and k, out_proj."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        hd = hidden // heads
        self.Wqkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = nn.LayerNorm(hd, eps=1e-6)
        self.k_norm = nn.LayerNorm(hd, eps=1e-6)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x_NTD):
        n, t, d = x_NTD.shape
        qkv = self.Wqkv(x_NTD).view(n, t, 3, self.heads, d // self.heads)
        q_NTHK, k_NTHK, v_NTHK = qkv.unbind(dim=2)
        q_NTHK, k_NTHK = self.q_norm(q_NTHK), self.k_norm(k_NTHK)
        o_NHTK = _attention(q_NTHK.transpose(1, 2), k_NTHK.transpose(1, 2), v_NTHK.transpose(1, 2))
        return self.out_proj(o_NHTK.transpose(1, 2).reshape(n, t, d))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Softmax router -> top-k (raw probabilities, no renorm) -> routed SwiGLUs + unweighted shared."""

    def __init__(self, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, 4 * hidden) for _ in range(experts))
        self.shared_experts = SwiGLU(hidden, 2 * hidden)

    def route(self, u_BD):
        """(expert ids [B, k], weights [B, k]) of each token."""
        probs_BE = F.linear(u_BD.float(), self.gate.weight.float()).softmax(dim=-1)
        w_BK, ids_BK = torch.topk(probs_BE, self.top_k, dim=-1, sorted=True)
        return ids_BK, w_BK

    def forward(self, u_NTD):
        n, t, d = u_NTD.shape
        u_BD = u_NTD.reshape(n * t, d)
        ids_BK, w_BK = self.route(u_BD)
        ids_A, w_A = ids_BK.reshape(-1), w_BK.reshape(-1)
        order_A = ids_A.argsort()
        counts_E = torch.bincount(ids_A, minlength=len(self.experts))
        ends_E = counts_E.cumsum(0).tolist()
        token_A = order_A // self.top_k  # token each sorted assignment belongs to
        routed_BD = torch.zeros_like(u_BD)
        start = 0
        for e, end in enumerate(ends_E):
            if end > start:
                tok = token_A[start:end]
                y = self.experts[e](u_BD[tok]) * w_A[order_A[start:end], None].to(u_BD.dtype)
                routed_BD.scatter_add_(0, tok[:, None].expand(-1, d), y)
            start = end
        return (routed_BD + self.shared_experts(u_BD)).reshape(n, t, d)


class Block(nn.Module):
    def __init__(self, cfg: OracleConfig):
        super().__init__()
        d = cfg.hidden
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = (FlashAttention if cfg.flash else TimmAttention)(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.moe = SparseMoE(d, cfg.experts, cfg.top_k)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x_NTD, c_ND):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c_ND).chunk(6, dim=1)
        x_NTD = x_NTD + g1[:, None] * self.attn(modulate(self.norm1(x_NTD), s1, sc1))
        return x_NTD + g2[:, None] * self.moe(modulate(self.norm2(x_NTD), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x_NTD, c_ND):
        shift, scale = self.adaLN_modulation(c_ND).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x_NTD), shift, scale))


class OracleDiTMoE(nn.Module):
    """forward(x [N, C, S, S], t [N], y [N]) -> [N, C_out, S, S]."""

    def __init__(self, cfg: OracleConfig):
        super().__init__()
        self.cfg = cfg
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        grid = cfg.input_size // cfg.patch
        self.x_embedder = PatchEmbed(cfg.patch, cfg.in_channels, cfg.hidden)
        self.t_embedder = TimestepEmbedder(cfg.hidden)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.hidden), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden, cfg.patch, self.out_channels)
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_table(cfg.hidden, grid)[None])

    def unpatchify(self, x_NTP):
        n, t, _ = x_NTP.shape
        g, p, c = int(math.isqrt(t)), self.cfg.patch, self.out_channels
        x = x_NTP.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # N, C, g, p, g, p
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x, t, y):
        x_NTD = self.x_embedder(x) + self.pos_embed
        c_ND = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x_NTD = block(x_NTD, c_ND)
        return self.unpatchify(self.final_layer(x_NTD, c_ND))


@torch.no_grad()
def randomize_(model: OracleDiTMoE, seed: int = 0) -> OracleDiTMoE:
    """Random weights with O(1) activations everywhere: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1²),
    affine norm weights ~ 1 + N(0, 0.1²), so adaLN gates, routing and outputs are all non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            continue
        z = torch.randn(p.shape, generator=gen)
        if p.dim() >= 2:
            p.copy_(z / math.sqrt(p[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * z)
        else:
            p.copy_(0.1 * z)
    return model


def oracle_inputs(cfg: OracleConfig, n: int, seed: int = 0):
    """(x, t, y) with t in (0, 1] (rectified-flow convention) and some null-class labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.rand(n, generator=gen).clamp_min(1e-3)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=gen)
    return x, t, y
