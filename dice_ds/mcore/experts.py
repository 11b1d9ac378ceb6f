"""Grouped routed experts: every local expert of a MoE layer in two grouped GEMMs.

Owns ``GroupedExperts``, a megatron ``MegatronModule`` plugged into ``MoELayer``'s spec as the
alternative to megatron's ``SequentialMLP``, selected by ``ModelConfig.experts_impl = "grouped"``
(``dice_ds/mcore/layer.py`` builds one or the other), and its grouped GEMM (``grouped_linear``). The
helpers that let the rest of dice_ds treat both implementations alike (``expert_weight_views``,
``is_routed_expert_param``) are in ``dice_ds/models/experts.py``.

Contract (the one megatron's ``MoELayer.routed_experts_compute`` and ``dice_ds/moe/runtime.py``
rely on): ``forward(tokens [R, D], tokens_per_expert [L], permuted_probs [R]) -> (out [R, D], None)``
with rows sorted by local expert, ``tokens_per_expert[i]`` rows for expert i (zero allowed). Per
expert it computes SwiGLU without bias exactly like megatron's expert ``MLP``:
``fc2((silu(gate) * up) * prob)`` with ``[gate; up] = fc1(x)``; the router prob multiplies the
activation before fc2 and the product is cast back to the activation dtype.

Weights are stored stacked, one tensor per projection, so that a grouped GEMM can take them as is:

- ``fc1_weight`` [L, 2F, D]: expert i's ``linear_fc1.weight`` (= cat(gate_proj, up_proj)),
- ``fc2_weight`` [L, D, F]: expert i's ``linear_fc2.weight`` (= down_proj).

The released key format maps onto this layout in ``dice_ds/weights/keymap.py`` (the only place keys are
mapped); checkpoints are implementation-independent.

Grouped GEMM backend: ``torch._grouped_mm`` (one call over all experts, offsets = cumulative row
counts; no host sync for the counts) on CPU in every dtype (measured: equal to a per-expert
``F.linear`` loop bit for bit and faster; ``scripts/bench_experts.py``; on CPU gate and up are two
grouped GEMMs on views of ``fc1_weight``, which keeps the activation's inputs contiguous) and on CUDA
for bf16 on compute capability >= 9.0 (its CUDA kernel's requirement); anywhere else, and for row
strides the kernel rejects (it needs 16-byte aligned rows), a per-expert loop of ``F.linear``. The
``grouped_gemm`` package and TransformerEngine (which megatron's ``GroupedMLP`` / ``TEGroupedMLP``
need) are not installable on CPU machines.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects stride-0 (expanded) gradients, e.g. from ``.sum()``.
    """

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.contiguous()


def _use_grouped_mm(x: torch.Tensor, w_LND: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # the kernel needs 16-byte aligned row strides for both operands
    elem = x.element_size()
    if (x.shape[1] * elem) % 16 or (w_LND.shape[1] * elem) % 16:
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def grouped_linear(x_RD: torch.Tensor, w_LND: torch.Tensor, counts_L: torch.Tensor,
                   offs_L: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows of group i times ``w_LND[i].T``: [R, D] x [L, N, D] -> [R, N] (rows sorted by group)."""
    if _use_grouped_mm(x_RD, w_LND):
        if x_RD.stride() != (x_RD.shape[1], 1):  # "contiguous" with an odd stride on a size-1
            x_RD = torch.empty(x_RD.shape, dtype=x_RD.dtype, device=x_RD.device).copy_(x_RD)
        if offs_L is None:
            offs_L = torch.cumsum(counts_L.to(x_RD.device), 0).to(torch.int32)
        y = torch._grouped_mm(x_RD, w_LND.transpose(1, 2), offs=offs_L)
        return _ContiguousGrad.apply(y) if torch.is_grad_enabled() else y
    splits = [int(c) for c in counts_L.tolist()]
    parts = [F.linear(x, w_LND[i]) for i, x in enumerate(torch.split(x_RD, splits))]
    return torch.cat(parts) if parts else x_RD.new_zeros(0, w_LND.shape[1])


MIN_CPU_GROUP_ROWS = 16
"""On CPU an expert group with fewer rows is computed padded to this many (zero rows). MKL's
sgemm picks its kernel by the number of rows, and on AVX-512 machines a GEMM of 1-15 rows rounds
differently from the same rows inside a taller one (measured on a Xeon with AVX-512/AMX at
D = 64-8192, one thread; from 16 rows on, every row equals its value in a 600-row GEMM). Padding
makes a token's expert output independent of how many other tokens its expert got, which is what
makes EP equal DP bit for bit (an EP rank's experts get rows from every rank; docs/megatron-cpu.md
section 8). The AVX2 machines measured before had the same effect at 1-3 rows."""


def _pad_small_groups(x_RD: torch.Tensor, counts_L: torch.Tensor, probs_R: torch.Tensor):
    """(x, counts, probs, rows) with every non-empty group of fewer than ``MIN_CPU_GROUP_ROWS``
    rows padded with zero rows (zero probs) to that many; ``rows`` [R] are the original rows'
    positions in the padded tensors (None when nothing needed padding)."""
    counts = [int(c) for c in counts_L.tolist()]
    if not any(0 < c < MIN_CPU_GROUP_ROWS for c in counts):
        return x_RD, counts_L, probs_R, None
    counts_t = torch.tensor(counts)
    padded = torch.tensor([max(c, MIN_CPU_GROUP_ROWS) if c else 0 for c in counts])
    group_R = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
    start_orig = torch.cumsum(counts_t, 0) - counts_t
    start_pad = torch.cumsum(padded, 0) - padded
    rows = (start_pad - start_orig)[group_R] + torch.arange(len(group_R))
    xp = x_RD.new_zeros(int(padded.sum()), x_RD.shape[1])
    xp[rows] = x_RD
    pp = probs_R.new_zeros(xp.shape[0])
    pp[rows] = probs_R
    return xp, padded, pp, rows


class GroupedExperts(MegatronModule):
    """All local routed experts of one MoE layer, computed with grouped GEMMs (see module doc)."""

    stacked_weights = True  # fc1_weight [L, 2F, D], fc2_weight [L, D, F]

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None):
        super().__init__(config=config)
        unsupported = {
            "add_bias_linear": config.add_bias_linear,
            "moe_apply_probs_on_input": config.moe_apply_probs_on_input,
            "fp8": config.fp8, "fp4": getattr(config, "fp4", None),
            "moe_latent_size": getattr(config, "moe_latent_size", None),
        }
        bad = [f"{k}={v!r}" for k, v in unsupported.items() if v not in (False, None)]
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            bad.append("activation (needs gated_linear_unit with silu: SwiGLU)")
        if pg_collection is not None and pg_collection.expt_tp.size() != 1:
            bad.append(f"expert tensor parallel size {pg_collection.expt_tp.size()} (needs 1)")
        if bad:
            raise ValueError("experts_impl='grouped' does not support " + ", ".join(bad)
                             + "; use experts_impl='sequential'")
        self.num_local_experts = num_local_experts
        self.ep_group = None if pg_collection is None else pg_collection.ep
        f, d = config.moe_ffn_hidden_size, config.hidden_size
        self.ffn_hidden_size = f
        kw = {"dtype": config.params_dtype}  # on the default device (CPU, or meta in a context)
        if not config.use_cpu_initialization:
            kw["device"] = torch.cuda.current_device()
        self.fc1_weight = torch.nn.Parameter(torch.empty(num_local_experts, 2 * f, d, **kw))
        self.fc2_weight = torch.nn.Parameter(torch.empty(num_local_experts, d, f, **kw))
        for p in (self.fc1_weight, self.fc2_weight):
            p.allreduce = False  # megatron's marker for expert-parallel parameters
        if config.perform_initialization:
            for i in range(num_local_experts):
                config.init_method(self.fc1_weight[i])
                config.output_layer_init_method(self.fc2_weight[i])

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert,
                permuted_probs: torch.Tensor):
        """[R, D] rows sorted by local expert, counts [L], probs [R] -> ([R, D], None)."""
        x_RD = permuted_local_hidden_states.contiguous()
        if x_RD.shape[0] == 0:  # no rows on this rank (an empty tensor may carry any strides,
            # e.g. one received from an all-to-all, which torch._grouped_mm rejects)
            return x_RD.new_zeros(0, self.fc2_weight.shape[1]), None
        counts_L = torch.as_tensor(tokens_per_expert)
        rows = None
        if x_RD.device.type == "cpu":   # batch-invariant rows (MIN_CPU_GROUP_ROWS)
            x_RD, counts_L, permuted_probs, rows = _pad_small_groups(x_RD, counts_L,
                                                                     permuted_probs)
        offs_L = None
        if _use_grouped_mm(x_RD, self.fc1_weight):
            offs_L = torch.cumsum(counts_L.to(x_RD.device), 0).to(torch.int32)
        w1, f = self.fc1_weight, self.ffn_hidden_size
        if x_RD.device.type == "cpu":
            # gate and up as two grouped GEMMs on weight views: contiguous outputs make the
            # activation cheaper (measured 6-8 % faster at S/2 and XL/2 width; same values)
            gate_RF = grouped_linear(x_RD, w1[:, :f], counts_L, offs_L)
            up_RF = grouped_linear(x_RD, w1[:, f:], counts_L, offs_L)
        else:  # one GEMM on the contiguous weight (the layout the CUDA kernel expects)
            gate_RF, up_RF = torch.chunk(grouped_linear(x_RD, w1, counts_L, offs_L), 2, dim=-1)
        probs_R1 = permuted_probs.unsqueeze(-1)
        if torch.is_grad_enabled():
            act_RF = F.silu(gate_RF) * up_RF * probs_R1
        else:  # in place: same values, no extra [R, F] buffers
            act_RF = F.silu(gate_RF).mul_(up_RF).mul_(probs_R1)
        act_RF = act_RF.to(x_RD.dtype)
        out_RD = grouped_linear(act_RF, self.fc2_weight, counts_L, offs_L)
        return (out_RD if rows is None else out_RD[rows]), None

    def backward_dw(self):
        """megatron's delayed weight-gradient hook: nothing is delayed here."""

    def extra_repr(self) -> str:
        return (f"num_local_experts={self.num_local_experts}, hidden={self.fc1_weight.shape[2]}, "
                f"ffn={self.ffn_hidden_size}")
