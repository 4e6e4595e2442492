"""What a transformer block keeps for backward, and the two tools that keep it at (or under)
Korthikanti et al.'s count (arXiv 2205.05198, 16-bit activations, flash attention: 34·sbh per layer,
sbh·(10 + 24/t) with tensor parallelism t, 34·sbh/t with sequence parallelism).

    Dropout         saves no mask: it keeps the RNG state it drew from (a few bytes on CUDA, one
                    5 KB generator state on CPU) and draws the same mask again in backward. Megatron
                    counts one byte per element for each of the two residual masks (2·sbh).
    Recomputed      runs a cheap op (a norm, the MLP activation) without a graph, keeps only its
                    input, frees its output once the next GEMM has saved it, and refills that
                    storage by running the op again just before that GEMM's backward (Megatron's
                    CheckpointWithoutOutput): selective recompute for a flash-attention world.
    saved_terms     the bytes one block keeps, term by term, for this code (tests/dist/
                    test_activation_memory.py checks the sum against saved_tensors_hooks).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _draw_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)  # keep mask, x's shape


class _ReplayDropout(torch.autograd.Function):
    """y = x * mask / (1 - p), the mask drawn from the current default generator (so the tensor-
    parallel tracker's fork and a recompute's RNG replay govern it like any dropout); backward swaps
    the state back in, draws the same mask and swaps the caller's state back."""

    @staticmethod
    def forward(ctx, x, p: float):
        ctx.state = _rng_state(x.device)  # before the draw: replaying it redraws this mask
        ctx.p = p
        mask = _draw_mask(x, p)  # x's shape, bool
        return x * mask * (1.0 / (1.0 - p))  # x's shape

    @staticmethod
    def backward(ctx, grad):
        outer = _rng_state(grad.device)
        _set_rng_state(ctx.state, grad.device)
        try:
            mask = _draw_mask(grad, ctx.p)  # the forward's mask
        finally:
            _set_rng_state(outer, grad.device)  # backward leaves every stream where it was
        return grad * mask * (1.0 / (1.0 - ctx.p)), None


class Dropout(nn.Dropout):
    """nn.Dropout that keeps no mask for backward (see _ReplayDropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _ReplayDropout.apply(x, self.p)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, owner, n_args: int, *tensors):
        args = tensors[:n_args]  # fn's inputs; the rest are fn's parameters (so the output requires grad)
        with torch.no_grad():
            out = fn(*args)
        ctx.owner, ctx.recomputed = owner, None
        ctx.save_for_backward(*args)
        owner.ctx = ctx
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.recomputed is None:  # no consumer registered the refill: recompute here
            ctx.owner.refill(None)
        out, inputs, params = ctx.recomputed  # filled by Recomputed.refill before this node runs
        ctx.recomputed = ctx.owner = None
        wanted = [t for t in (*inputs, *params) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, None, *[next(grads) if t.requires_grad else None for t in (*inputs, *params)])


class Recomputed:
    """out = Recomputed(fn, module)(x) keeps only x; after the consumer GEMM has saved out,
    discard(consumer_output) frees out's storage and registers its recompute on consumer_output's
    grad_fn, which autograd runs before the consumer's own backward (it is downstream of it)."""

    def __init__(self, fn, module: nn.Module | None = None):
        self.fn = fn
        self.params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        self.ctx = None
        self.out = None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.out = _Recomputed.apply(self.fn, self, len(args), *args, *self.params)
        self.nbytes = self.out.untyped_storage().nbytes()
        return self.out

    def discard(self, consumer_output: torch.Tensor) -> None:
        if consumer_output.grad_fn is None or self.ctx is None:
            return
        self.out.untyped_storage().resize_(0)  # the consumer's saved reference now holds no bytes
        consumer_output.grad_fn.register_prehook(self.refill)

    def refill(self, grad_outputs):
        ctx = self.ctx
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = self.fn(*inputs)  # same op, same inputs: the same values
        storage = self.out.untyped_storage()
        storage.resize_(self.nbytes)
        with torch.no_grad():
            storage.copy_(out.untyped_storage())  # the consumer's saved tensor sees its values again
        ctx.recomputed = (out, inputs, self.params)
        self.ctx = self.out = None  # one backward per forward


def saved_terms(mc: ModelConfig, b: int, s: int, tp: int = 1, sp: bool = False, e: int = 2,
                recompute: str = "none", device: str = "cpu", dropout: bool = True,
                layer: int = 0) -> dict[str, int]:
    """Bytes block `layer` keeps for backward on one tp rank, term by term, for this code: the model
    in one dtype of e bytes (no autocast), attention through SDPA's flash kernel (no dropout inside
    attention), `dropout` the residual dropouts on. Parameters are not activations. A MoE block
    (model.moe) keeps moe_terms in place of the dense MLP's."""
    h, D = mc.hidden_size, mc.head_dim
    N = b * s  # tokens of the micro-batch
    Ns = N // tp if sp else N  # tokens of this rank's residual stream
    H, K = mc.num_attention_heads // tp, mc.num_kv_heads // tp
    inter = mc.intermediate_size // tp
    # LayerNorm's statistics (torch's native kernel: the mean and 1/std): the input's dtype on CPU,
    # fp32 on CUDA; RMSNorm and both norms with model.norm_saves_output (model/gpt.py) keep one fp32
    # 1/rms or 1/std per row on every device
    stats = 4 if mc.norm == "rmsnorm" or mc.norm_saves_output else 2 * (e if device == "cpu" else 4)
    if recompute == "full":
        return {"block input (kept by the checkpoint)": Ns * h * e}
    selective = recompute == "selective"
    # model.norm_saves_output: each norm keeps its output, the next GEMM's input (counted below), in
    # place of its input; selective recompute keeps the inputs either way (Recomputed reruns the norm)
    inputs_kept = selective or not mc.norm_saves_output
    terms = {
        # each norm keeps its input as it came (RMSNorm's own Function, LayerNorm natively)
        "norm inputs (ln1, ln2)": 2 * Ns * h * e if inputs_kept else 0,
        # 1/rms (RMSNorm), the mean and 1/std (LayerNorm), 1/std (norm_saves_output); recomputed
        # under selective
        "norm statistics": 0 if selective else 2 * Ns * stats,
        # the inputs of the QKV and FC1 GEMMs (sequence shards under SP; recomputed under selective)
        "norm outputs (qkv, fc1 inputs)": 0 if selective else 2 * Ns * h * e,
        "q, k, v (the fused qkv output)": N * (H + 2 * K) * D * e,
        "attention output (proj input)": N * H * D * e,
        "softmax log-sum-exp (fp32)": b * H * s * 4,
        # SwiGLU's [gate | up] (2I wide); its backward recomputes silu(gate) rather than keep it
        "fc1 output (activation input)": N * inter * (2 if mc.activation == "swiglu" else 1) * e,
        "activation output (fc2 input)": 0 if selective else N * inter * e,
        "dropout masks": 0,  # replayed from the RNG state (Dropout)
    }
    if mc.moe.is_moe(layer):  # the router and experts in place of fc1 / the activation (the norm output
        # before them is the router's input, counted above); under SP over the rank's own tokens
        del terms["fc1 output (activation input)"], terms["activation output (fc2 input)"]
        terms.update(moe_terms(mc, Ns, e))
    return terms


def grouped_gemm_applies(mc: ModelConfig, e: int) -> bool:
    """Whether the experts of model config mc, in a dtype of e bytes, take the grouped GEMM path by
    their shapes (model.moe.grouped_gemm on, torch having it, every width a 16-byte multiple); the
    device's own support is probed at run time."""
    m = mc.moe
    widths = (mc.hidden_size, m.intermediate_size or mc.intermediate_size)
    return m.grouped_gemm and hasattr(torch, "_grouped_mm") and all(w * e % 16 == 0 for w in widths)


def moe_terms(mc: ModelConfig, N: int, e: int) -> dict[str, int]:
    """Bytes a MoE block's MLP (model/moe.py) keeps for backward over N tokens (every tp rank runs it
    on the whole sequence, under SP on its shard; selective recompute keeps all of it: the experts'
    activations are not recomputed). M = N x top_k routed rows (dropless; with a capacity factor at
    most E capacities: an upper bound, the rows kept depend on the routing);
    under expert parallelism a rank keeps the rows its experts received instead of those it sent,
    on average the same count."""
    m = mc.moe
    E, k, I, C = m.num_experts, m.top_k, m.intermediate_size, mc.hidden_size  # noqa: E741
    M = N * k
    if m.capacity_factor is not None:
        M = min(M, E * math.ceil(m.capacity_factor * N * k / E))
    w = 2 if mc.activation == "swiglu" else 1
    terms = {
        # softmax / sigmoid keep their output; top-k its indices (int64), which gather shares
        "router scores (fp32), chosen experts (int64)": N * E * 4 + N * k * 8,
        # renormalised top-k weights: the division keeps the weights and their sum
        "top-k weights (fp32)": N * k * 4 + N * 4 if m.norm_topk_prob or m.router == "sigmoid" else 0,
        # the gathered rows (or, under ep, those received), the experts' GEMM input
        "routed rows (expert fc1 inputs)": M * C * e,
        "token and sort-order indices (int64)": 2 * M * 8,
        # torch._grouped_mm's end row per expert (int32), shared by both grouped GEMMs
        "expert group offsets (int32)": E * 4 if grouped_gemm_applies(mc, e) else 0,
        "expert fc1 outputs": M * w * I * e,
        # SwiGLU: silu(gate) and the product (fc2's input); GELU: its output
        "expert activation outputs": M * I * e * w,
        # the expert outputs and their routing weights, kept by the weighting product, and the
        # weighted rows, kept by the index_add that scatters them back to their tokens
        "expert outputs, weights, weighted rows": 2 * M * C * e + M * e,
        # the capacity mask, kept by weights * keep
        "capacity mask": N * k if m.capacity_factor is not None else 0,
        # the router's losses: z keeps the fp32 logits and their log-sum-exp; the balancing loss its
        # shares f (and, sigmoid, the scores' per-token sums)
        "router losses": (N * E * 4 + N * 4 if m.z_loss_coeff > 0 else 0)
        + (E * 4 + (N * 4 if m.router == "sigmoid" else 0) if m.aux_loss_coeff > 0 else 0),
    }
    if m.num_shared_experts:  # a SwiGLU / GELU MLP of their summed width S, and Qwen2-MoE's gate
        S = m.shared_intermediate_size
        terms["shared experts (fc1 output, activation output)"] = N * w * S * e + N * S * e
        if m.shared_expert_gate:
            terms["shared expert gate (sigmoid, shared output)"] = N * e + N * C * e
    return terms


def korthikanti_bytes(b: int, s: int, h: int, tp: int = 1, sp: bool = False, recompute: str = "none") -> int:
    """Activation bytes per layer from Korthikanti et al., 16-bit, without the 5as/h attention
    term (flash attention): full recompute keeps the layer input (2sbh, a shard of it under SP),
    selective and none keep 34sbh/t with SP, sbh(10 + 24/t) without."""
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh // (tp if sp else 1)
    return 34 * sbh // tp if sp else 10 * sbh + 24 * sbh // tp
