"""Data parallelism: average gradients over the data-parallel group, in buckets, once per step.

Each dp rank runs its own micro-batches (rank r takes the r-th slice of every micro-batch round:
data.dataset.rank_micro_batch_starts, called by Trainer.next_batches) and accumulates their
gradients locally; this one all-reduce per optimizer step — not per micro-batch — then makes the
gradient the mean over the whole global batch, exactly as serial accumulation over all its
micro-batches would.
"""

from __future__ import annotations

import torch

from ..distributed import comm

BUCKET_BYTES = 25 * 2**20  # like DDP's default bucket: few collectives, bounded extra memory


def allreduce_gradients(params, group, bucket_bytes: int = BUCKET_BYTES) -> None:
    """grad <- mean over the group, for every param with a grad; flattened into buckets."""
    n = comm.size(group)
    if n == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        comm.all_reduce(flat, group)
        flat.div_(n)
        for g, new in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
            g.copy_(new.view_as(g))
        bucket, size = [], 0

    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or size + g.numel() * g.element_size() > bucket_bytes):
            flush()
        bucket.append(g)
        size += g.numel() * g.element_size()
    flush()
