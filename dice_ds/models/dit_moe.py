"""DiT-MoE (spec §1.1) as plain single-device code whose FFNs are megatron-core ``MoELayer``s.

Owns ``DiTMoE`` (patch/timestep/class embeddings, adaLN-Zero blocks, final layer, unpatchify),
``forward_with_cfg`` (one merged forward on the doubled batch), ``build_model`` and ``init_weights``.
Expert parallelism enters only through the process groups handed to ``build_model``: with an EP
group of size W each MoE layer holds E/W experts (megatron's contiguous placement, or the slots of
an expert ``placement``, ``dice_ds/placement.py``); everything else is replicated. DICE modes
are installed afterwards by ``dice_ds.parallel.parallelize_dit_moe``; sequence parallelism enters
through the ``sp_runtime`` seam (token shard after the embeddings, full-length gather before the
final layer) and each attention's ``runtime`` (K/V).

Shape legend: N batch, T tokens, D hidden, C channels, S latent side.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dice_ds import mcore
from dice_ds.config import ModelConfig
from dice_ds.hugepages import advise_huge_pages
from dice_ds.models.layers import (
    ATTENTION_LAYOUTS,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)
from dice_ds.models.experts import expert_weight_views, is_routed_expert_param

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype names used by the CLI (``--dtype``, ``--a2a-dtype``) and configs."""


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g_msa·Attn(mod(LN(x))); x += g_mlp·MoE(mod(LN(x)))."""

    def __init__(self, cfg: ModelConfig, moe: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = ATTENTION_LAYOUTS[cfg.attn_layout](d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.moe = moe
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))

    def forward(self, x_NTD: torch.Tensor, c_ND: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c_ND
        ).chunk(6, dim=1)
        x_NTD = x_NTD + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x_NTD), shift_msa, scale_msa))
        u_NTD = modulate(self.norm2(x_NTD), shift_mlp, scale_mlp)
        return x_NTD + gate_mlp.unsqueeze(1) * self.moe(u_NTD)


class DiTMoE(nn.Module):
    """Class-conditional DiT with MoE FFNs. forward(x [N,C,S,S], t [N], y [N]) -> [N, C_out, S, S]."""

    def __init__(self, cfg: ModelConfig, pg_collection, params_dtype: torch.dtype = torch.float32,
                 placement=None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        grid = cfg.input_size // cfg.patch_size
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(d, grid).unsqueeze(0), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, mcore.build_moe_layer(cfg, pg_collection, i, params_dtype, placement))
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)
        self.sp_runtime = None  # set by dice_ds.parallel.sp: shards the tokens over the SP group

    def moe_layers(self) -> list[nn.Module]:
        return [b.moe for b in self.blocks]

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Tokens [N, T, D] (positions added) and conditioning c [N, D]."""
        x_NTD = self.x_embedder(x) + self.pos_embed
        c_ND = self.t_embedder(t) + self.y_embedder(y)
        return x_NTD, c_ND

    def head(self, x_NTD: torch.Tensor, c_ND: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.final_layer(x_NTD, c_ND), self.cfg.patch_size, self.cfg.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_NTD, c_ND = self.embed(x, t, y)
        sp = self.sp_runtime
        if sp is not None:
            x_NTD = sp.shard_tokens(x_NTD)  # [N, T/W, D]: this rank's contiguous chunk
        for block in self.blocks:
            x_NTD = block(x_NTD, c_ND)
        if sp is not None:
            x_NTD = sp.gather_tokens(x_NTD)
        return self.head(x_NTD, c_ND)

    def forward_with_cfg(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance as one merged forward on [z; z], [t; t], [y; null].

        Returns the guided prediction for the first ``in_channels`` channels (the ε / velocity part),
        guided on ``guided_channels`` of them (all by default; the DDPM path uses 3, spec §1.4), plus
        the conditional half of the remaining (learned-variance) channels.
        """
        n = z.shape[0]
        null = torch.full_like(y, self.cfg.num_classes)
        out = self(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out[:n], out[n:]
        c = self.cfg.in_channels
        g = c if guided_channels is None else guided_channels
        guided = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)


def build_model(cfg: ModelConfig, groups=None, params_dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", placement=None) -> DiTMoE:
    """Build a DiT-MoE on ``groups`` (a ``dice_ds.parallel.groups.ModelGroups``; None: a world of
    one rank, where every group is the default group), without
    allocating first: the module tree is built on the meta device, then every parameter is
    materialised once, uninitialised, directly on ``device`` in ``params_dtype`` (only this rank's
    experts exist). Fill it with ``init_weights`` or ``dice_ds.weights.load.load_into_model``; only
    ``pos_embed`` (a fixed table) is computed here.

    A constructor without side effects: it starts no process group, checks no version and patches
    nothing: the entry point has started the default process group and called
    ``dice_ds.mcore.prepare(device)`` (the pipeline, the CLI and the tests' fixtures do).

    ``placement``: a ``dice_ds.placement.Placement`` for the groups' EP size (None: megatron's
    contiguous placement).
    """
    if not mcore.prepared(device):
        raise RuntimeError(f"build_model on {device}: megatron-core is not prepared; call "
                           f"dice_ds.mcore.prepare({str(device)!r}) at the entry point first (it "
                           "checks the pinned version and applies patches/megatron_cpu.py on CPU)")
    if groups is None and not (dist.is_initialized() and dist.get_world_size() == 1):
        raise RuntimeError("build_model without groups needs a started 1-rank world; pass "
                           "groups=local_model_groups() (dice_ds.parallel.groups) otherwise")
    pgs = mcore.process_groups(groups)
    if placement is not None:
        placement.validate(num_experts=cfg.num_experts, ep_size=pgs.ep.size(), depth=cfg.depth)
    with torch.device("meta"):
        model = DiTMoE(cfg, pgs, params_dtype, placement).to(dtype=params_dtype)
    model.to_empty(device=device)
    advise_huge_pages(model.parameters())  # before the first write (dice_ds/hugepages.py)
    fill_fixed_tables(model)
    return model.eval()


@torch.no_grad()
def fill_fixed_tables(model: DiTMoE) -> None:
    """Compute the tensors that are not weights (the sin-cos ``pos_embed``) in place."""
    grid = model.cfg.input_size // model.cfg.patch_size
    table = sincos_pos_embed_2d(model.cfg.hidden_size, grid).unsqueeze(0)
    model.pos_embed.copy_(table.to(model.pos_embed.dtype))


@torch.no_grad()
def init_weights(model: DiTMoE, mode: str = "random", seed: int = 0, std: float = 0.02) -> DiTMoE:
    """Initialise every trainable weight deterministically from ``seed``.

    ``mode='dit'``: DiT's scheme (xavier linears, adaLN-Zero: modulation and output zeroed), as for
    training. ``mode='random'``: every weight N(0, std) and biases too, so that an untrained model
    produces non-trivial outputs (tests). Expert weights are drawn per *global* expert index, so a
    rank holding experts [a, b) gets the same values as a single-process model's experts a..b-1.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(p: torch.Tensor, scale: float = std):
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(scale).to(p.dtype))

    for name, p in model.named_parameters():
        if name == "pos_embed" or is_routed_expert_param(name):
            continue
        if mode == "random":
            is_norm_weight = "norm" in name and name.endswith("weight")
            draw(p, 0.1 if is_norm_weight else std)
            if is_norm_weight:
                p.add_(1.0)
        elif mode == "dit":
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
            elif p.dim() >= 2:
                nn.init.xavier_uniform_(p.view(p.shape[0], -1), generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        else:
            raise ValueError(f"init mode {mode!r}: use 'random' or 'dit'")
    # experts: one generator stream per (layer, global expert) so placement does not change values
    for li, moe in enumerate(model.moe_layers()):
        for local_i, weights in enumerate(expert_weight_views(moe.experts)):
            global_e = moe.local_logical_experts[local_i]  # the logical expert of the slot
            egen = torch.Generator().manual_seed(seed * 1_000_003 + li * 1009 + global_e)
            for p in weights:
                if mode == "dit":
                    nn.init.xavier_uniform_(p, generator=egen)
                else:
                    p.copy_(torch.randn(p.shape, generator=egen).mul_(std).to(p.dtype))
    return model
