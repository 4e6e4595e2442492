"""Conjugate autograd ops at the edges of tensor-parallel regions (Megatron's mappings).

Each pair is forward/backward conjugate: what one does forward, the other does backward.
    copy_to_tp       fwd identity          bwd all-reduce     (enter a TP region)
    reduce_from_tp   fwd all-reduce        bwd identity       (leave a row-parallel layer)
    scatter_to_tp    fwd split last dim    bwd all-gather
    gather_from_tp   fwd all-gather last   bwd split
Sequence parallelism (activations sharded along the sequence dim, dim 1 of (B, T, C)):
    scatter_to_sp    fwd split seq         bwd all-gather seq
    gather_from_sp   fwd all-gather seq    bwd reduce-scatter seq   (enter a column-parallel GEMM)
    reduce_scatter_to_sp  fwd reduce-scatter seq  bwd all-gather seq (leave a row-parallel GEMM)
Every op takes its group; a group of size 1 makes each an identity.
"""

from __future__ import annotations

import torch

from ..distributed import comm

SEQ_DIM = 1


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = comm.size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=dim)[comm.rank(group)].contiguous()


def _conjugate(name: str, fwd, bwd):
    """An autograd op (x, group) -> fwd(x, group) whose backward is bwd(grad, group)."""
    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return fwd(x, group)

        @staticmethod
        def backward(ctx, grad):
            return bwd(grad, ctx.group), None
    Op.__name__ = Op.__qualname__ = name
    return Op.apply


def _identity(x, group):
    return x


def _sum(x, group):
    return comm.all_reduce(x.contiguous().clone(), group)  # never reduce into autograd's own buffer


def _gather_last(x, group):
    return comm.all_gather(x, group, dim=-1)


def _split_last(x, group):
    return _split(x, group, -1)


def _gather_seq(x, group):
    return comm.all_gather(x, group, dim=SEQ_DIM)


def _split_seq(x, group):
    return _split(x, group, SEQ_DIM)


def _reduce_scatter_seq(x, group):
    return comm.reduce_scatter(x, group, dim=SEQ_DIM)


#                                       forward              backward
copy_to_tp = _conjugate("CopyToTP", _identity, _sum)
reduce_from_tp = _conjugate("ReduceFromTP", _sum, _identity)
scatter_to_tp = _conjugate("ScatterToTP", _split_last, _gather_last)
gather_from_tp = _conjugate("GatherFromTP", _gather_last, _split_last)
scatter_to_sp = _conjugate("ScatterToSP", _split_seq, _gather_seq)
gather_from_sp = _conjugate("GatherFromSP", _gather_seq, _reduce_scatter_seq)
reduce_scatter_to_sp = _conjugate("ReduceScatterToSP", _reduce_scatter_seq, _gather_seq)
