"""Fused linear + cross-entropy for training: the full (N, V) logits are never materialised.

For a 50k vocabulary the logits dwarf every activation (8 x 256 tokens x 50257 x 4 B = 412 MB),
and on CPU the memory-bound passes over them (log_softmax, its backward, zero fills) cost about a
quarter of a training step. The loss is the last op of the graph, so its gradient is known up to
the scalar upstream grad: each chunk of rows computes its logits, the loss, and d(loss)/d(logits)
= (softmax - onehot) / n_valid in place, then immediately the two gradient GEMMs. backward() only
scales the stored grads. Same FLOPs as the unfused path (3 GEMMs), a fraction of the memory
traffic, and peak memory of one chunk instead of three full logit tensors.
"""

from __future__ import annotations

import torch


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index: int, chunk: int):
        # x (N, C), weight (V, C), labels (N,)
        valid = labels != ignore_index  # (N,)
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 in exactness tests
        n_valid = valid.sum().clamp(min=1).to(acc)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=acc)
        total = torch.zeros((), dtype=acc, device=x.device)
        # Under autocast the products are torch's (16-bit) ones, as written: no out= forms there.
        direct = x.dtype == weight.dtype and not _autocast_on(x.device.type)
        # One (chunk, V) buffer for the whole loop, not a fresh one per chunk: on CPU each fresh
        # allocation this large is an mmap whose pages fault in (and are zeroed) on first touch.
        # (torch.logsumexp needs no (chunk, V) temporary of its own: no second buffer.)
        n0, V = min(chunk, x.shape[0]), weight.shape[0]
        # The (chunk, V) buffers are views of (chunk, Vp) ones: rows Vp = V rounded up to 64 elements
        # apart, so every row starts 128-byte aligned. cuBLAS's tensor-core GEMMs need aligned leading
        # dimensions; with an odd V (GPT-2's 50257) the three head GEMMs otherwise fall back to
        # kernels that took 40% of a GPT-2 small step on an H200 (docs/benchmarks.md, bench_gpu).
        Vp = -(-V // 64) * 64
        buf = torch.empty((n0, Vp), dtype=torch.promote_types(x.dtype, torch.float32),
                          device=x.device)[:, :V]  # the chunk's logits, then its softmax gradient
        # 16-bit compute: the product lands in a padded 16-bit buffer, which later holds the 16-bit
        # softmax gradient that the two gradient GEMMs read (same bytes as the temporaries it replaces)
        half = (torch.empty((n0, Vp), dtype=x.dtype, device=x.device)[:, :V]
                if direct and buf.dtype != x.dtype else None)
        for s in range(0, x.shape[0], chunk):
            xc, yc, vc = x[s:s + chunk], labels[s:s + chunk], valid[s:s + chunk]
            n = xc.shape[0]
            if direct and buf.dtype == x.dtype:
                logits = torch.mm(xc, weight.t(), out=buf[:n])  # (n, V)
            elif half is not None:  # softmax in fp32 even when the product is 16-bit
                logits = buf[:n].copy_(torch.mm(xc, weight.t(), out=half[:n]))  # (n, V)
            else:  # autocast: torch's own 16-bit product
                logits = buf[:n].copy_(xc @ weight.t())  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            safe_y = torch.where(vc, yc, torch.zeros_like(yc))
            rows = torch.arange(n, device=x.device)
            total += ((lse - logits[rows, safe_y]) * vc).sum()
            # d loss / d logits = (softmax - onehot) / n_valid, computed in place over the chunk.
            probs = logits.sub_(lse[:, None]).exp_()  # (n, V)
            probs[rows, safe_y] -= 1.0
            probs.mul_((vc.to(probs.dtype) / n_valid)[:, None])
            g = half[:n].copy_(probs) if half is not None else probs.to(x.dtype)  # (n, V)
            if direct:
                torch.mm(g, weight, out=grad_x[s:s + chunk])  # (n, C), straight into its rows
            else:
                grad_x[s:s + chunk] = g @ weight.to(g.dtype)  # (n, C)
            if g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), xc)  # accumulate in place: no (V, C) temporary per chunk
            else:
                grad_w += (g.t() @ xc).to(acc)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.used = False
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        # The gradients were made in forward: they are scaled in place and handed out, not copied
        # (a fresh (V, C) and (N, C) per step otherwise), so they can be handed out only once.
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: a second backward through the same graph "
                               "(retain_graph) is not supported")
        ctx.used = True
        grad_x, grad_w = ctx.saved_tensors
        # loss.backward() passes exactly 1: nothing to scale (checked on CPU only, where it is free)
        if not (grad_out.device.type == "cpu" and grad_out.item() == 1.0):
            grad_x.mul_(grad_out.to(grad_x.dtype))
            grad_w.mul_(grad_out.to(grad_w.dtype))
        return grad_x, grad_w, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk: int = 1024) -> torch.Tensor:
    """mean CE of (x @ weight.T) against labels over non-ignored rows; x (N, C), weight (V, C)."""
    return _LinearCrossEntropy.apply(x, weight, labels, ignore_index, chunk)
