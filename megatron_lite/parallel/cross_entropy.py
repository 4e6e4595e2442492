"""Vocab-parallel cross-entropy: each rank holds logits for its slice of the (padded) vocabulary,
and the loss is assembled with three all-reduces of one float per token (max, sum of exps, target
logit) — the full logits are never gathered. Padded vocabulary columns (ids >= vocab_size) are
masked to -inf, so they are never predicted and the loss equals the serial one exactly.
"""

from __future__ import annotations

import torch

from ..distributed import comm


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start: int, vocab_size: int, group, ignore_index: int):
        # logits (N, Vl) local slice [vocab_start, vocab_start + Vl); labels (N,) global ids
        acc = torch.promote_types(logits.dtype, torch.float32)
        x = logits.to(acc, copy=True)
        n_local = x.shape[-1]
        pad_from = vocab_size - vocab_start  # local columns >= this are padding
        if pad_from < n_local:
            x[:, max(pad_from, 0):] = float("-inf")
        m = x.max(dim=-1).values  # (N,)
        comm.all_reduce(m, group, op="max")
        x.sub_(m[:, None])  # shifted logits
        valid = labels != ignore_index
        mine = valid & (labels >= vocab_start) & (labels < vocab_start + n_local)
        local_label = torch.where(mine, labels - vocab_start, torch.zeros_like(labels))
        rows = torch.arange(len(labels), device=labels.device)
        # the target's shifted logit lives on exactly one rank: the others contribute 0
        target = torch.where(mine, x[rows, local_label], torch.zeros_like(m))
        x.exp_()  # softmax numerators, in place
        sum_exp = x.sum(dim=-1)
        comm.all_reduce(sum_exp, group)
        comm.all_reduce(target, group)
        n_valid = valid.sum().clamp(min=1).to(acc)
        loss = ((sum_exp.log() - target) * valid).sum() / n_valid
        x.div_(sum_exp[:, None])  # softmax over the full vocabulary, our slice
        ctx.save_for_backward(x, local_label, mine, valid, n_valid)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        probs, local_label, mine, valid, n_valid = ctx.saved_tensors
        rows = torch.arange(len(local_label), device=probs.device)
        g = probs.clone()
        g[rows, local_label] -= mine.to(g.dtype)
        g.mul_((valid.to(g.dtype) * grad / n_valid)[:, None])
        return g.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                 vocab_size: int, group, ignore_index: int = -100) -> torch.Tensor:
    """Mean CE over non-ignored rows; logits (N, V_local) this rank's vocab slice, labels (N,)."""
    return _VocabParallelCE.apply(logits, labels, vocab_start, vocab_size, group, ignore_index)
