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


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return comm.all_reduce(g.contiguous().clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, ctx.group, dim=-1), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather(x, group, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, -1), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, ctx.group, dim=SEQ_DIM), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather(x, group, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return comm.reduce_scatter(g, ctx.group, dim=SEQ_DIM), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter(x, group, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, ctx.group, dim=SEQ_DIM), None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp(x, group):
    return _ScatterToTP.apply(x, group)


def gather_from_tp(x, group):
    return _GatherFromTP.apply(x, group)


def scatter_to_sp(x, group):
    return _ScatterToSP.apply(x, group)


def gather_from_sp(x, group):
    return _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x, group):
    return _ReduceScatterToSP.apply(x, group)
