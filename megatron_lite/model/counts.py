"""The model's size and work, one definition each, used by the trainer (MFU), plan and the CLI.

Parameters are counted on a meta-device GPT (nothing allocated), so they are what the code builds:
a tied embedding once, biases and norms included.

FLOPs are model FLOPs, the standard definition (Narayanan et al. 2021, eq. 3; PaLM, appendix B):
2 per multiply-accumulate of every matmul (the block's projections, the attention scores and their
weighted sum, the LM head, which is a real GEMM even when tied), the backward twice the forward.
Norms, biases, activations and softmax are memory-bound and not counted; nor, by default, are the
recomputed forward (`recompute=True` counts it: hardware FLOPs) or the causal mask's skipped half
(`causal_half=True`: what a flash kernel really computes). For a plain GPT this is
72·B·s·l·h²·(1 + s/6h + V/12lh) per step (96·B·s·l·h²·(1 + s/6h + V/16lh) with recompute).
A mixture of experts counts its active FLOPs: the top_k experts each token is sent to.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .gpt import GPT


def param_count(mc: ModelConfig) -> int:
    """Parameters of the whole (serial) model, counted without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(mc, seed=None).parameters())


def mlp_flops(mc: ModelConfig, N: int, layer: int = 0) -> float:
    """Forward FLOPs of block `layer`'s MLP over N tokens: the dense MLP, or under model.moe the
    router, the top_k experts each token is sent to (active FLOPs, dropless) and the shared experts
    (and their gate)."""
    h, per_width = mc.hidden_size, 3 if mc.activation == "swiglu" else 2
    moe = mc.moe
    if not moe.is_moe(layer):
        return 2 * N * h * mc.intermediate_size * per_width
    routed = 2 * N * h * moe.intermediate_size * per_width * moe.top_k
    shared = 2 * N * h * moe.shared_intermediate_size * per_width if moe.num_shared_experts else 0
    gate = 2 * N * h * (moe.num_experts + (1 if moe.shared_expert_gate else 0))
    return routed + shared + gate


def layer_flops(mc: ModelConfig, b: int, s: int, causal_half: bool = False, layer: int = 0) -> float:
    """Forward FLOPs of one transformer block for b sequences of s tokens (whole block, all tp ranks);
    `layer` matters only for MoE models (which blocks are MoE)."""
    h, D = mc.hidden_size, mc.head_dim
    N = b * s
    qkv = 2 * N * h * (mc.num_attention_heads + 2 * mc.num_kv_heads) * D
    proj = 2 * N * mc.num_attention_heads * D * h
    attn = 4 * b * s * s * mc.num_attention_heads * D * (0.5 if causal_half else 1.0)
    return qkv + proj + mlp_flops(mc, N, layer) + attn


def head_flops(mc: ModelConfig, b: int, s: int) -> float:
    """Forward FLOPs of the LM head (logits over the unpadded vocabulary)."""
    return 2 * b * s * mc.hidden_size * mc.vocab_size


def model_flops(mc: ModelConfig, batch: int, s: int, recompute: bool = False,
                causal_half: bool = False) -> float:
    """FLOPs of one training step over `batch` sequences of s tokens: forward + 2x backward of every
    block and the head; `recompute` adds the blocks' forward once more."""
    blocks = sum(layer_flops(mc, batch, s, causal_half, i) for i in range(mc.num_layers))
    return (4 if recompute else 3) * blocks + 3 * head_flops(mc, batch, s)


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token at sequence length seq_len (what the trainer's MFU uses)."""
    return model_flops(mc, 1, seq_len) / seq_len
