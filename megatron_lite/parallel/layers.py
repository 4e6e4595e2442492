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
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)


def mark(p: torch.Tensor, **attrs) -> torch.Tensor:
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's output rows split over tp: rank r computes its slice of y.

    Input: full activations (or, with sequence_parallel, a sequence shard that is all-gathered
    first). Output: the local slice of the last dim, or the full y with gather_output=True.
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
        x = gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # (B, T, out / tp)
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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, C)
        return reduce_from_tp(out, self.group)


def tp_shard(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous slice of t along dim."""
    return t.chunk(comm.size(group), dim=dim)[comm.rank(group)].contiguous()
