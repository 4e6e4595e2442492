"""Megatron-style tensor-parallel layers. Each holds only its shard; the shard is sliced from the
serial model's (master) weight by parallelize(), so TP=1 and TP=N start bit-identical.

Parameter attributes read by the gradient utilities:
    p.tensor_parallel = True     sharded over tp: grad-norm sums it over tp ranks
    p.sequence_parallel = True   replicated but fed a sequence shard: its grad is all-reduced over tp
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import comm
from .mappings import (
    SEQ_DIM,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)


def mark(p: torch.Tensor, **attrs) -> torch.Tensor:
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


class _GatherLinear(torch.autograd.Function):
    """y = all_gather_seq(x) W^T + b that saves only the sequence shard x (Megatron's
    ColumnParallelLinear under sequence parallelism): backward all-gathers x again for the weight
    gradient and reduce-scatters the input gradient. Keeping the gathered input instead would hold
    tp times the bytes for every column-parallel GEMM (the QKV and FC1 inputs: 2 x 2sbh in bf16).

    The GEMMs are the ones autograd runs for F.linear (grad_x = g W, grad_W = g^T x, grad_b = sum
    g), so the numbers are the same as gather_from_sp followed by F.linear. Under autocast the
    operands are cast as F.linear's autocast would cast them (before the gather, which commutes
    with a cast), and the weight is cast again in backward instead of keeping a copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        # x (B, T / tp, in) this rank's shard; weight (out / tp, in)
        dev = x.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        with torch.autocast(dev, enabled=False):
            if cast is not None:
                x = x.to(cast)  # (B, T / tp, in)
            w = weight if cast is None else weight.to(cast)  # (out / tp, in)
            b = bias if bias is None or cast is None else bias.to(cast)
            total = comm.all_gather(x, group, dim=SEQ_DIM)  # (B, T, in)
            # F.linear's (B, T, out / tp) would be a view of its 2-D product, and a custom Function
            # must not return a view that is later changed in place (RoPE rotates q, k inside the
            # qkv output): the same product, written into a tensor of the output's own shape.
            y = torch.empty(*total.shape[:-1], w.shape[0], dtype=total.dtype, device=total.device)
            flat = total.reshape(-1, total.shape[-1])  # (B T, in)
            if b is None:
                torch.mm(flat, w.t(), out=y.view(-1, w.shape[0]))
            else:
                torch.addmm(b, flat, w.t(), out=y.view(-1, w.shape[0]))  # (B T, out / tp)
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.cast, ctx.has_bias = group, cast, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        w = weight if ctx.cast is None else weight.to(ctx.cast)  # (out / tp, in)
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (B T, out / tp)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_total = g.mm(w).view(*grad_y.shape[:-1], w.shape[1])  # (B, T, in)
            grad_x = comm.reduce_scatter(grad_total, ctx.group, dim=SEQ_DIM)  # (B, T / tp, in)
        if ctx.needs_input_grad[1]:
            total = comm.all_gather(x, ctx.group, dim=SEQ_DIM)  # (B, T, in): the shard, gathered again
            grad_w = g.t().mm(total.reshape(-1, total.shape[-1])).to(weight.dtype)  # (out / tp, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)  # (out / tp,)
        return grad_x, grad_w, grad_b, None


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """all_gather_seq(x) W^T + b keeping only the shard x for backward: x (B, T / tp, in) -> (B, T, out)."""
    return _GatherLinear.apply(x, weight, bias, group)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's output rows split over tp: rank r computes its slice of y.

    Input: full activations (or, with sequence_parallel, a sequence shard that is all-gathered
    first; only the shard is kept for backward, see _GatherLinear). Output: the local slice of the
    last dim, or the full y with gather_output=True.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, gather_output: bool = False,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(weight)  # (out / tp, in)
        mark(self.weight, tensor_parallel=True)
        self.bias = nn.Parameter(bias) if bias is not None else None
        if self.bias is not None:
            mark(self.bias, tensor_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            y = gather_linear(x, self.weight, self.bias, self.group)  # (B, T, out / tp)
        else:
            y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)  # (B, T, out / tp)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's input columns split over tp: partial products are summed over tp
    (all-reduce, or reduce-scatter along the sequence under sequence parallelism); the bias is
    added once, after the reduction."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, input_is_parallel: bool = True,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(weight)  # (out, in / tp)
        mark(self.weight, tensor_parallel=True)
        self.bias = nn.Parameter(bias) if bias is not None else None
        if self.bias is not None and sequence_parallel:
            mark(self.bias, sequence_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = F.linear(x, self.weight)  # (B, T, out): this rank's partial sum
        y = reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split over tp; each rank looks up the ids it
    owns, zeros the rest, and the partial results are summed over tp."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, group):
        super().__init__()
        self.group = group
        self.vocab_start = vocab_start
        self.vocab_end = vocab_start + weight.shape[0]
        self.weight = nn.Parameter(weight)  # (padded_vocab / tp, C)
        mark(self.weight, tensor_parallel=True)
        self.lookup = F.embedding  # (ids, weight) -> rows; the distributed optimizer may defer its gradient

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = self.lookup(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, C)
        return reduce_from_tp(out, self.group)


def tp_shard(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous slice of t along dim."""
    return t.chunk(comm.size(group), dim=dim)[comm.rank(group)].contiguous()
