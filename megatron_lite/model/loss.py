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

HEAD_PAD = 64  # on CUDA the head's GEMMs run over the vocabulary rounded up to a multiple of this


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index: int, chunk: int, pad_to: int):
        # x (N, C), weight (V, C), labels (N,)
        valid = labels != ignore_index  # (N,)
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 in exactness tests
        n_valid = valid.sum().clamp(min=1).to(acc)
        V = weight.shape[0]
        # The three GEMMs run over Vp = V rounded up to pad_to: an odd vocabulary (GPT-2's 50257) puts
        # them on cuBLAS's slow fallback kernels (40% of a GPT-2 small step on an H200, bench_gpu).
        # The weight's extra rows are zero, so the extra logits are exactly 0 and never read (every
        # softmax step works on the [:, :V] view), and the gradient's extra columns stay 0 as well.
        Vp = -(-V // pad_to) * pad_to
        w = weight
        if Vp != V:
            w = weight.new_zeros((Vp, weight.shape[1]))  # (Vp, C), a copy for this call only
            w[:V] = weight
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros((Vp, weight.shape[1]), dtype=acc, device=x.device)  # (Vp, C)
        total = torch.zeros((), dtype=acc, device=x.device)
        # Under autocast the products are torch's (16-bit) ones, as written: no out= forms there.
        direct = x.dtype == weight.dtype and not _autocast_on(x.device.type)
        # One (chunk, Vp) buffer for the whole loop, not a fresh one per chunk: on CPU each fresh
        # allocation this large is an mmap whose pages fault in (and are zeroed) on first touch.
        # (torch.logsumexp needs no (chunk, V) temporary of its own: no second buffer.)
        n0 = min(chunk, x.shape[0])
        buf = torch.empty((n0, Vp), dtype=torch.promote_types(x.dtype, torch.float32),
                          device=x.device)  # the chunk's logits, then its softmax gradient
        # 16-bit compute: the product lands in a 16-bit buffer, which later holds the 16-bit softmax
        # gradient that the two gradient GEMMs read (the bytes of the temporaries it replaces)
        half = (torch.empty((n0, Vp), dtype=x.dtype, device=x.device)
                if direct and buf.dtype != x.dtype else None)
        for s in range(0, x.shape[0], chunk):
            xc, yc, vc = x[s:s + chunk], labels[s:s + chunk], valid[s:s + chunk]
            n = xc.shape[0]
            if direct and buf.dtype == x.dtype:
                full = torch.mm(xc, w.t(), out=buf[:n])  # (n, Vp)
            elif half is not None:  # softmax in fp32 even when the product is 16-bit
                full = buf[:n].copy_(torch.mm(xc, w.t(), out=half[:n]))  # (n, Vp)
            else:  # autocast: torch's own 16-bit product
                full = buf[:n].copy_(xc @ w.t())  # (n, Vp)
            logits = full[:, :V]  # (n, V) the real vocabulary; full[:, V:] is 0
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            safe_y = torch.where(vc, yc, torch.zeros_like(yc))
            rows = torch.arange(n, device=x.device)
            total += ((lse - logits[rows, safe_y]) * vc).sum()
            # d loss / d logits = (softmax - onehot) / n_valid, computed in place over the chunk.
            probs = logits.sub_(lse[:, None]).exp_()  # (n, V)
            probs[rows, safe_y] -= 1.0
            probs.mul_((vc.to(probs.dtype) / n_valid)[:, None])
            if half is not None:
                half[:n, :V].copy_(probs)
                g = half[:n]  # (n, Vp) 16-bit, its last Vp - V columns still the product's zeros
            else:
                g = full.to(x.dtype)  # (n, Vp) no copy unless autocast's compute dtype differs
            if direct:
                torch.mm(g, w, out=grad_x[s:s + chunk])  # (n, C), straight into its rows
            else:
                grad_x[s:s + chunk] = g @ w.to(g.dtype)  # (n, C)
            if g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), xc)  # accumulate in place: no (Vp, C) temporary per chunk
            else:
                grad_w += (g.t() @ xc).to(acc)
        ctx.save_for_backward(grad_x, grad_w[:V].to(weight.dtype))
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
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk: int = 1024,
                         pad_to: int | None = None) -> torch.Tensor:
    """mean CE of (x @ weight.T) against labels over non-ignored rows; x (N, C), weight (V, C). The
    GEMMs run over the vocabulary rounded up to pad_to (default: 64 on CUDA, where cuBLAS needs it
    aligned; 1 elsewhere, where it only costs the weight's copy)."""
    if pad_to is None:
        pad_to = HEAD_PAD if x.device.type == "cuda" else 1
    return _LinearCrossEntropy.apply(x, weight, labels, ignore_index, chunk, pad_to)
