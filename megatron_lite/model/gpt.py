"""A GPT you can read in one sitting. It knows nothing of distribution (never imports
torch.distributed); megatron_lite.parallel turns it into its tensor/pipeline-parallel form.

Shapes: B batch, T sequence, C hidden, H query heads, K kv heads, D head dim, V vocab.
Parameter names (blocks.{i}.attn.qkv.weight, ...) are the global, layout-independent keys used by
init and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, noop_context_fn

from ..config import ModelConfig
from .activations import Dropout, Recomputed
from .init import init_weights, master_init
from .loss import linear_cross_entropy
from .moe import MoE, RouterStats, shared_config


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, saves_output=cfg.norm_saves_output)
    return LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias, saves_output=cfg.norm_saves_output)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim: nn.RMSNorm's math and parameter
    (`weight`, so checkpoints and HF names are unchanged), with its own backward. Autograd through
    torch's composite RMSNorm keeps the fp32 upcast of x and the fp32 x/rms (4 + 4 bytes per element
    under bf16); _RMSNormFunction keeps x as it came (2 bytes) and one fp32 1/rms per row, or with
    saves_output (model.norm_saves_output) y instead of x: the tensor the next GEMM keeps anyway."""

    def __init__(self, dim: int, eps: float, saves_output: bool = False):
        super().__init__()
        self.eps = eps
        self.saves_output = saves_output
        self.weight = nn.Parameter(torch.ones(dim))  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.saves_output)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, saves_output={self.saves_output}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and names); with saves_output (model.norm_saves_output) its
    forward is _LayerNormFunction, which keeps y and one fp32 1/std per row instead of x, the mean
    and 1/std that torch's native layer norm keeps."""

    def __init__(self, dim: int, eps: float, bias: bool = True, saves_output: bool = False):
        super().__init__(dim, eps=eps, bias=bias)
        self.saves_output = saves_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.saves_output:
            return super().forward(x)
        return _LayerNormFunction.apply(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, saves_output={self.saves_output}"


# Megatron/Apex's "memory-efficient" norms (model.norm_saves_output): the norm keeps its output y
# rather than its input. y is the input of the GEMM that follows (qkv, fc1; under sequence
# parallelism the shard gather_linear keeps), which saves that very tensor, so y costs nothing more
# and the norm's input (the residual stream) is no longer kept. Backward recovers the normalised
# input as x_hat = (y - bias) / weight in the compute dtype. Where a weight is exactly 0, y carries
# nothing of that channel's x_hat (and a tiny weight scales up y's rounding error), so the divisor's
# magnitude is clamped to >= eps (sign kept, 0 taken as positive): no division by zero, but where
# |weight| < eps the recovered x_hat is wrong, and with it that channel's weight gradient and, through
# the means over the row, the row's input gradient: approximate there, as in Apex. Norm weights
# start at 1.
def _safe_divisor(weight: torch.Tensor, eps: float) -> torch.Tensor:
    floor = torch.full_like(weight, eps)
    return torch.where(weight >= 0, torch.maximum(weight, floor), torch.minimum(weight, -floor))


def _norm_grads(ctx, grad, x_hat, rstd, weight, centred: bool, x_dtype):
    """Input and weight gradients of y = x_hat * weight (+ bias), x_hat = (x - mean) * rstd with the
    mean over the last dim (centred, LayerNorm) or none (RMSNorm). With gx = grad * weight (the
    gradient reaching x_hat), means over the last dim:
        dx = rstd * (gx - mean(gx) - x_hat * mean(gx * x_hat))   (mean(gx): LayerNorm only)
        dweight = sum over rows of grad * x_hat
    (the mean terms are the statistics' own dependence on x)"""
    g = grad.to(rstd.dtype)  # (B, T, C)
    dx = dweight = None
    if ctx.needs_input_grad[0]:
        gx = g * weight.to(rstd.dtype)  # (B, T, C)
        inner = gx - x_hat * (gx * x_hat).mean(-1, keepdim=True)  # (B, T, C)
        if centred:
            inner = inner - gx.mean(-1, keepdim=True)
        dx = (inner * rstd).to(x_dtype)  # (B, T, C) in x's dtype
    if ctx.needs_input_grad[1]:
        dweight = (g * x_hat).flatten(0, -2).sum(0).to(weight.dtype)  # (C,)
    return dx, dweight


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm computed in fp32 (fp64 stays fp64), the result cast back to x's dtype. Saves
    rstd = 1/rms (B, T, 1) and either x (backward recomputes x_hat = x * rstd, exactly the forward's
    values) or, with saves_output, y (x_hat = y / weight; see _safe_divisor). Gradients: _norm_grads.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, saves_output: bool = False):
        wide = torch.promote_types(x.dtype, torch.float32)  # the compute dtype: fp32 or fp64
        xw = x.to(wide)  # (B, T, C); a temporary, not saved
        rstd = torch.rsqrt(xw.square().mean(-1, keepdim=True) + eps)  # (B, T, 1)
        y = (xw * rstd * weight.to(wide)).to(x.dtype)  # (B, T, C)
        ctx.save_for_backward(y if saves_output else x, weight, rstd)
        ctx.eps, ctx.saves_output, ctx.x_dtype = eps, saves_output, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        kept, weight, rstd = ctx.saved_tensors
        wide = rstd.dtype
        if ctx.saves_output:  # (B, T, C): x_hat recovered from the output
            x_hat = kept.to(wide) / _safe_divisor(weight.to(wide), ctx.eps)
        else:  # (B, T, C): the forward's normalised input, recomputed
            x_hat = kept.to(wide) * rstd
        dx, dweight = _norm_grads(ctx, grad, x_hat, rstd, weight, False, ctx.x_dtype)
        return dx, dweight, None, None


class _LayerNormFunction(torch.autograd.Function):
    """LayerNorm computed in fp32 (fp64 stays fp64), the result cast back to x's dtype, that saves its
    output y and rstd = 1/std (B, T, 1); backward recovers x_hat = (y - bias) / weight (see
    _safe_divisor). The mean is not kept: x_hat already has it taken out."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        wide = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(wide)  # (B, T, C); a temporary, not saved
        centred = xw - xw.mean(-1, keepdim=True)  # (B, T, C)
        rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)  # (B, T, 1)
        y = centred * rstd * weight.to(wide)  # (B, T, C)
        if bias is not None:
            y = y + bias.to(wide)
        y = y.to(x.dtype)
        ctx.save_for_backward(y, weight, bias, rstd)
        ctx.eps, ctx.x_dtype = eps, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        y, weight, bias, rstd = ctx.saved_tensors
        wide = rstd.dtype
        shifted = y.to(wide) if bias is None else y.to(wide) - bias.to(wide)  # (B, T, C)
        x_hat = shifted / _safe_divisor(weight.to(wide), ctx.eps)  # (B, T, C)
        dx, dweight = _norm_grads(ctx, grad, x_hat, rstd, weight, True, ctx.x_dtype)
        dbias = None
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = grad.to(wide).flatten(0, -2).sum(0).to(bias.dtype)  # (C,)
        return dx, dweight, dbias, None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention) with precomputed cos/sin tables."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, D/2)
        # Not persistent: derived from the config, so never part of a checkpoint.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        T = x.shape[-2]
        cos = self.cos[start:start + T].to(x.dtype)  # (T, D/2)
        sin = self.sin[start:start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def rotate_qkv_(self, qkv: torch.Tensor, heads: int, start: int,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate the first `heads` heads (q's and k's) of the fused (B, T, (H + 2K) D) projection
        in place: q, k, v stay views of one tensor, so attention keeps (H + 2K) D per token instead
        of that plus rotated copies of q and k. Token t sits at position start + t, or at
        positions[b, t] when given (packed documents restarting their positions)."""
        T = qkv.shape[1]
        if positions is None:
            cos = self.cos[start:start + T, None].to(qkv.dtype)  # (T, 1, D/2)
            sin = self.sin[start:start + T, None].to(qkv.dtype)
        else:
            cos = self.cos[positions][:, :, None].to(qkv.dtype)  # (B, T, 1, D/2)
            sin = self.sin[positions][:, :, None].to(qkv.dtype)
        return _RotateInPlace.apply(qkv, heads, cos, sin)


class _RotateInPlace(torch.autograd.Function):
    """RoPE on heads [0, heads) of qkv, in place (the GEMM that made qkv does not save it). The
    rotation is linear, so backward rotates the gradient back and saves nothing; its products
    and sums are the ones autograd forms for RotaryEmbedding.forward."""

    @staticmethod
    def forward(ctx, qkv, heads: int, cos, sin):
        B, T, _ = qkv.shape
        D = cos.shape[-1] * 2
        x = qkv.view(B, T, -1, D)[:, :, :heads]  # (B, T, heads, D)
        x1, x2 = x.chunk(2, dim=-1)  # (B, T, heads, D/2) each
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
        ctx.mark_dirty(qkv)
        ctx.heads, ctx.cos, ctx.sin = heads, cos, sin  # buffers' slices, not activations
        return qkv

    @staticmethod
    def backward(ctx, grad):
        B, T, _ = grad.shape
        cos, sin = ctx.cos, ctx.sin
        out = grad.clone()  # (B, T, (H + 2K) D): v's heads pass through
        g = grad.view(B, T, -1, cos.shape[-1] * 2)[:, :, :ctx.heads]  # (B, T, heads, D)
        g1, g2 = g.chunk(2, dim=-1)  # (B, T, heads, D/2) each
        out.view(B, T, -1, cos.shape[-1] * 2)[:, :, :ctx.heads] = torch.cat(
            (g1 * cos + g2 * sin, g2 * cos - g1 * sin), dim=-1)
        return out, None, None, None


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=torch.float32,
                 kv_heads: int | None = None):
        # kv_heads: heads held by this process (fewer than cfg.num_kv_heads under tensor parallelism)
        shape = (cfg.num_layers, batch, kv_heads or cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens already cached (same for every layer between forwards)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot append up to {end}.")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, K, S, D)


class Documents(NamedTuple):
    """Packed documents of a batch (data.document_mask): attention stays inside each document.

    segments  (B, T) int64: the document each input token belongs to, non-decreasing along T.
    positions (B, T) int64 or None: each token's position (data.reset_position_ids restarts it at
              every document); None = 0..T-1 as without packing."""
    segments: torch.Tensor
    positions: torch.Tensor | None = None

    def to(self, device) -> Documents:
        positions = None if self.positions is None else self.positions.to(device)
        return Documents(self.segments.to(device), positions)

    def attention(self, dtype: torch.dtype) -> Attend:
        """What every block's attention reads, for activations of `dtype`."""
        s = self.segments
        T = s.shape[1]
        same = s[:, :, None] == s[:, None, :]  # (B, T, T): both tokens in one document
        causal = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()  # (T, T)
        return Attend(additive_mask((same & causal)[:, None], dtype), self.positions)  # mask (B, 1, T, T)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: may attend) as the float mask SDPA adds to the scores: 0 or -inf.
    Built once per forward: SDPA converts a boolean mask to this on every call and keeps the
    copy for its backward, which would be one (B, 1, T, T) float tensor per layer; handed the float
    mask, every layer keeps the same one."""
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # (B, 1, Tq, Tk)
    return zeros.masked_fill_(~allowed, float("-inf"))


class Attend(NamedTuple):
    """Per-forward inputs of attention besides x: mask (B, 1, T, T) additive (0 where a query may
    see a key, -inf where not; None = plain causal), in the activations' dtype, and positions
    (B, T) (None = start..start + T - 1)."""
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, Documents | None]:
    """A micro-batch is (ids, labels) or (ids, labels, Documents)."""
    ids, labels, *docs = batch
    return ids, labels, (docs[0] if docs else None)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.n_head = cfg.num_attention_heads  # heads held by this module (fewer under TP)
        self.n_kv = cfg.num_kv_heads
        self.dropout = cfg.dropout
        # RNG context for the attention-probability dropout; tensor parallelism swaps in a per-rank
        # stream (parallel/random.py), since each rank holds different heads.
        self.core_rng = contextlib.nullcontext
        self.recompute_core = False  # selective activation checkpointing (GPT.set_recompute)
        self.recompute_context = noop_context_fn
        # Fused [q | k | v] projection: one GEMM; TP slices each of the three blocks by heads.
        self.qkv = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.bias)
        self.resid_drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None, cache: KVCache | None = None,
                attend: Attend | None = None):
        H, K, D = self.n_head, self.n_kv, self.head_dim
        qkv = self.qkv(x)  # (B, T, (H + 2K) D); T is the full sequence even if x is a shard (SP)
        B, T, _ = qkv.shape
        start = cache.length if cache is not None else 0
        attend = attend or Attend()
        if rope is not None:
            qkv = rope.rotate_qkv_(qkv, H + K, start, attend.positions)  # (B, T, (H + 2K) D), q, k rotated
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D), S = start + T
        S = k.shape[2]
        mask, causal = None, False
        if attend.mask is not None:  # packed documents (or context parallelism's shard)
            mask = attend.mask  # (B, 1, T, T) additive
            if mask.dtype != q.dtype:  # autocast computes in another dtype than the activations
                mask = mask.to(q.dtype)
        elif S == T:
            causal = True
        elif T > 1:  # chunked prefill after a cached prefix: query i sees keys <= start + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        # Selective recompute reruns the core only where SDPA keeps (B, H, T, T) tensors: attention
        # dropout off CUDA takes the math path (probabilities and mask saved); the flash and
        # memory-efficient kernels keep q, k, v, the output and the log-sum-exp, so recomputing
        # them would buy back only the (B, H, T) log-sum-exp for a second attention forward.
        core_keeps_scores = self.dropout > 0 and q.device.type != "cuda"
        if self.recompute_core and core_keeps_scores and self.training and torch.is_grad_enabled():
            y = checkpoint(self.core, q, k, v, mask, causal, use_reentrant=False,
                           context_fn=self.recompute_context)
        else:
            y = self.core(q, k, v, mask, causal)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.resid_drop(self.proj(y))  # (B, T, C)

    def core(self, q, k, v, mask, causal):
        """softmax(q k^T / sqrt(D)) v with dropout: q (B, H, T, D), k, v (B, K, S, D) -> (B, H, T, D).
        Grouped-query attention: each kv head serves H/K consecutive query heads; SDPA reads them
        in place (enable_gqa), so no repeated (B, H, S, D) copies of k and v are made or saved."""
        with self.core_rng():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  dropout_p=self.dropout if self.training else 0.0,
                                                  enable_gqa=k.shape[1] != q.shape[1])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        # GPT-2 used the tanh approximation of GELU ("gelu"); BERT and HF's "gelu" are the exact erf form.
        self.gelu_approximate = "none" if cfg.activation == "gelu_exact" else "tanh"
        inter = cfg.intermediate_size
        # SwiGLU fuses [gate | up] into one GEMM; TP slices both halves the same way.
        self.fc1 = nn.Linear(cfg.hidden_size, inter * (2 if self.swiglu else 1), bias=cfg.bias)
        self.fc2 = nn.Linear(inter, cfg.hidden_size, bias=cfg.bias)
        self.drop = Dropout(cfg.dropout)
        self.recompute_act = False  # selective recompute: keep fc1's output only (GPT.set_recompute)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return _SwiGLU.apply(h)  # (B, T, I) from (B, T, 2I) = [gate | up]
        return F.gelu(h, approximate=self.gelu_approximate)  # (B, T, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, T, I) or (B, T, 2I)
        if self.recompute_act and self.training and torch.is_grad_enabled():
            # fc2 saves act's output; it is freed once saved and recomputed from h (which the
            # activation's backward needs anyway) just before fc2's backward: I fewer per token.
            act = Recomputed(self.act)
            y = self.fc2(act(h))  # (B, T, C)
            act.discard(y)
        else:
            y = self.fc2(self.act(h))  # (B, T, C)
        return self.drop(y)  # (B, T, C)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up from h = [gate | up] (B, T, 2I). Autograd on the composite keeps h (gate and
    up are views of it) and silu(gate) for up's gradient; this keeps h only and recomputes
    silu(gate) in backward (one elementwise op over I per token): I fewer elements per token."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)  # (B, T, I) each, views of h
        ctx.save_for_backward(h)
        return F.silu(gate).mul_(up)  # (B, T, I); the silu temporary becomes the output

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)  # (B, T, I) each
        grad_up = grad * F.silu(gate)  # (B, T, I): silu(gate) recomputed
        # silu's derivative sigmoid(g) (1 + g (1 - sigmoid(g))) through autograd's own kernel
        # (fp32 inside for bf16), so the gradients equal those of F.silu(gate) * up
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # (B, T, I)
        return torch.cat((grad_gate, grad_up), dim=-1)  # (B, T, 2I)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); the mlp is a mixture of
    experts (model/moe.py) in the blocks model.moe makes MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, router_stats: RouterStats | None = None):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln2 = make_norm(cfg)
        if cfg.moe.is_moe(layer_idx):
            shared = shared_config(cfg)
            self.mlp = MoE(cfg, layer_idx, router_stats or RouterStats(), MLP(shared) if shared else None)
        else:
            self.mlp = MLP(cfg)
        self.recompute_norms = False  # selective recompute: keep the norms' inputs only (GPT.set_recompute)

    def forward(self, x, rope=None, cache=None, attend=None):
        if not (self.recompute_norms and cache is None and self.training and torch.is_grad_enabled()):
            x = x + self.attn(self.ln1(x), rope, cache, attend)  # (B, T, C)
            return x + self.mlp(self.ln2(x))  # (B, T, C)
        # Each norm's output is what the next GEMM (qkv, fc1) saves; it is freed after the sub-block's
        # forward and recomputed from the norm's input (kept as the residual anyway) in its backward.
        n1 = Recomputed(self.ln1, self.ln1)
        a = self.attn(n1(x), rope, cache, attend)  # (B, T, C)
        n1.discard(a)
        x = x + a  # (B, T, C)
        n2 = Recomputed(self.ln2, self.ln2)
        m = self.mlp(n2(x))  # (B, T, C)
        n2.discard(m)
        return x + m  # (B, T, C)


class LMHead(nn.Module):
    """Logits and the loss: (x (B, T, C), labels (B, T) | None) -> (logits | None, loss | None).
    A module of its own so tensor parallelism can swap in its vocab-parallel head under the same
    name (`lm_head.weight` stays the parameter's name in every layout)."""

    def __init__(self, n_embd: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, n_embd))  # (V, C), initialised by init_weights
        self.fused_loss = True  # see model/loss.py; False = plain logits + F.cross_entropy

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is not None and self.fused_loss and torch.is_grad_enabled():
            # Training: loss and its gradient chunk by chunk; the (B, T, V) logits never exist.
            return None, linear_cross_entropy(x.flatten(0, 1), self.weight, labels.flatten())
        logits = F.linear(x, self.weight)  # (B, T, V)
        loss = None
        if labels is not None:
            # Loss in fp32 even under bf16 autocast; -100 marks positions to ignore.
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(wide.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return logits, loss


class GPT(nn.Module):
    """The GPT, or the part of it one pipeline stage holds: `layers` (global block indices),
    `embed` (token/position embeddings) and `head` (final norm + LM head). Parameter names are the
    global ones either way (blocks.{i}...). A stage that has the head but not the embedding gets
    its own copy of tied embeddings, initialised identically (pipelining keeps the copies in sync)."""

    def __init__(self, cfg: ModelConfig, seed: int | None = 0, layers=None, embed: bool = True,
                 head: bool = True):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.layers = list(range(cfg.num_layers)) if layers is None else sorted(layers)
        self.has_embed, self.has_head = embed, head
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if embed else None
        self.pos_emb = nn.Embedding(cfg.max_sequence_length, cfg.hidden_size) \
            if embed and cfg.position_embedding == "learned" else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_sequence_length, cfg.rope_theta) \
            if cfg.position_embedding == "rope" else None
        self.drop = Dropout(cfg.dropout) if embed else None
        # what the MoE blocks measure (expert load, aux losses) and their aux losses' gradient scale
        self.router_stats = RouterStats([i for i in range(cfg.num_layers) if cfg.moe.is_moe(i)],
                                        cfg.moe.num_experts)
        # A dict keyed by the global index, so a stage's blocks keep their global names.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i, self.router_stats) for i in self.layers})
        self.ln_f = make_norm(cfg) if head else None
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size) if head else None
        if head and embed and cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.recompute = "none"  # none | full (whole blocks) | selective (see set_recompute)
        self.recompute_context = noop_context_fn
        if seed is not None:
            init_weights(self, cfg, seed)
            if head and not embed and cfg.tie_embeddings and not self.lm_head.weight.is_meta:
                with torch.no_grad():  # the last stage's copy of the tied embedding
                    self.lm_head.weight.copy_(master_init("tok_emb.weight", self.lm_head.weight.shape,
                                                          cfg, seed))

    def set_recompute(self, mode: str, context_fn=None) -> None:
        """Activation checkpointing (what each mode keeps per block: model/activations.py saved_terms).

        'full' keeps each block's input and recomputes the whole block in backward.
        'selective' recomputes the cheap ops whose outputs a GEMM saves, never a GEMM: the two norms
        (their outputs, the qkv and fc1 inputs, and their statistics; each norm's input is kept)
        and the MLP activation (its output, fc2's input; fc1's output is kept). In bf16 that is
        2 x 2sbh + 8sbh of Korthikanti's 34sbh per layer. The attention core is recomputed only
        where SDPA would keep (B, H, T, T) scores (attention dropout off CUDA): with the flash
        kernels it keeps q, k, v, its output (proj's input anyway) and a (B, H, T) log-sum-exp, so
        Megatron's original "core_attn" recompute would buy almost nothing in a flash world.
        context_fn (torch checkpoint's) lets tensor parallelism replay its dropout RNG stream on
        recompute."""
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"recompute mode {mode!r}")
        self.recompute = mode
        for block in self.blocks.values():
            block.recompute_norms = block.mlp.recompute_act = mode == "selective"
            block.attn.recompute_core = mode == "selective"
            block.attn.recompute_context = context_fn or noop_context_fn
        self.recompute_context = context_fn or noop_context_fn

    # The three pieces a pipeline stage composes: embed (first stage), blocks, head (last stage).
    def embed(self, ids: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_emb(ids)  # (B, T, C)
        if self.pos_emb is not None:
            if positions is None:
                positions = torch.arange(start, start + ids.shape[1], device=ids.device)  # (T,)
            x = x + self.pos_emb(positions)  # (T, C) broadcast over B, or (B, T, C)
        return self.drop(x)

    def head(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        x = self.ln_f(x)  # (B, T, C)
        return self.lm_head(x, labels)

    def run_block(self, i: int, x: torch.Tensor, cache: KVCache | None = None,
                  attend: Attend | None = None) -> torch.Tensor:
        block = self.blocks[str(i)]
        if self.recompute == "full" and cache is None and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, self.rope, None, attend, use_reentrant=False,
                              context_fn=self.recompute_context)
        return block(x, self.rope, cache, attend)

    def run(self, x: torch.Tensor, layers, labels: torch.Tensor | None = None, first: bool = True,
            last: bool = True, docs: Documents | None = None):
        """One pipeline chunk: embed x (ids) if first, the given blocks, the head if last.
        Returns (logits, loss) from the last chunk, else the hidden states (B, T, C)."""
        if first:
            x = self.embed(x, positions=docs.positions if docs is not None else None)
        attend = docs.attention(x.dtype) if docs is not None else None
        for i in layers:
            x = self.run_block(i, x, attend=attend)
        return self.head(x, labels) if last else x

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None, cache: KVCache | None = None,
                docs: Documents | None = None):
        """ids (B, T) -> (logits (B, T, V), mean cross-entropy over labels or None).

        With labels and autograd on (training), logits are None: the loss is computed by the fused
        linear + cross-entropy, which never materialises them (model/loss.py). `docs` keeps the
        attention of packed documents inside each one (and may restart their positions)."""
        if not (self.has_embed and self.has_head):
            raise RuntimeError("this GPT holds one pipeline stage; run its chunks with GPT.run")
        T = ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_sequence_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_sequence_length="
                             f"{self.config.max_sequence_length}")
        if docs is not None and cache is not None:
            raise ValueError("packed documents (docs) are for training and evaluation, not for decoding")
        x = self.embed(ids, start, docs.positions if docs is not None else None)
        attend = docs.attention(x.dtype) if docs is not None else None
        for i in self.layers:
            x = self.run_block(i, x, cache, attend)
        if cache is not None:
            cache.length += T
        return self.head(x, labels)


@torch.no_grad()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Sample max_new_tokens after ids (B, T0); temperature 0 is greedy. Returns (B, T0 + new)."""
    model.eval()
    cfg = model.config
    max_len = cfg.max_sequence_length
    cache = None
    for _ in range(max_new_tokens):
        if use_cache and (cache is None or cache.length + 1 > max_len):
            # (Re)fill the cache from the last max_len/2 tokens: learned positions cannot extend.
            window = ids[:, -max(1, max_len // 2):] if ids.shape[1] >= max_len else ids
            dtype = next(model.parameters()).dtype
            cache = KVCache(cfg, ids.shape[0], max_len, ids.device, dtype,
                            kv_heads=next(iter(model.blocks.values())).attn.n_kv)
            logits, _ = model(window, cache=cache)
        elif use_cache:
            logits, _ = model(ids[:, -1:], cache=cache)
        else:
            logits, _ = model(ids[:, -max_len:])
        logits = logits[:, -1, :].float()  # (B, V)
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
