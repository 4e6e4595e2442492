"""Mixture of experts: the MLP of a block replaced by num_experts MLPs, each token sent to top_k.

Plain PyTorch, serial: expert parallelism (parallel/expert_parallel.py) swaps the `experts` module
from outside, as TP swaps layers; everything before and after that call stays on the token's rank.

  router     logits = x W_r (N, E), scores = softmax(logits) (Mixtral, Qwen) or sigmoid(logits)
             (DeepSeek-V3); the top_k experts by score (plus the balancing bias, if any); their
             weights are the chosen scores, renormalised to sum to 1 (norm_topk_prob; always for
             sigmoid)
  experts    E SwiGLU / GELU MLPs without biases, stacked: fc1 (E, 2I | I, C), fc2 (E, C, I); the
             tokens are grouped by expert (one sort) and each group runs two GEMMs (grouped_mlp: one
             torch._grouped_mm for all experts where torch has it, else a loop over the experts)
  shared     num_shared_experts always-on experts as one MLP of their summed width (DeepSeek,
             Qwen2-MoE), optionally scaled per token by sigmoid(x w_g) (Qwen2-MoE's gate)
  capacity   dropless by default; with capacity_factor each expert takes at most
             ceil(capacity_factor x N x top_k / E) of the micro-batch's N tokens, in token order
             (first come, first served: deterministic), the rest dropped (their weight 0)
  losses     Switch / GShard load balancing: E x sum_e f_e P_e, f_e the share of the N x top_k
             assignments that chose e (before dropping), P_e the mean score of e (sigmoid scores
             normalised per token); router z-loss: mean over tokens of logsumexp(logits)^2. Their
             weighted sum enters the gradient through the block's output (AddAuxLoss) so the model
             and the pipeline keep one loss tensor; the values are recorded for the metrics.
  bias       DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores
             for the choice only (never to the weights), not trained; after each optimizer step
             update_bias moves it by bias_update_rate x sign(mean load - load of e).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .activations import Dropout


class RouterStats:
    """What the MoE layers of one model measured since the last take(): per layer the tokens each
    expert was sent (summed over forwards), the assignments dropped, and the losses' values; and the
    scale of the auxiliary losses' gradient, set by whoever runs backward (1 / micro-batches per
    step, as the main loss is averaged). One object shared by every MoE layer of a model (of a
    pipeline stage); tensors stay where they were computed until take(). `layers`: the MoE layers
    of the whole model, so that every stage's take() lays out the same numbers and a sum over the
    stages assembles them (a stage without layer i contributes zeros for it)."""

    def __init__(self, layers: list[int] = (), num_experts: int = 0):
        self.scale = 1.0
        self.layers, self.num_experts = list(layers), num_experts
        self._clear()

    def _clear(self):
        self.load: dict[int, torch.Tensor] = {}  # layer -> (E,) tokens per expert (before dropping)
        self.dropped: dict[int, torch.Tensor] = {}  # layer -> assignments dropped
        self.losses: dict[str, list[torch.Tensor]] = {"aux_loss": [], "z_loss": []}

    def record(self, layer: int, load: torch.Tensor, dropped: torch.Tensor, aux, z) -> None:
        self.load[layer] = self.load[layer] + load if layer in self.load else load
        self.dropped[layer] = self.dropped[layer] + dropped if layer in self.dropped else dropped
        for name, value in (("aux_loss", aux), ("z_loss", z)):
            if value is not None:
                self.losses[name].append(value.detach())

    def take(self, reduce=None, device=None) -> dict[str, float]:
        """Metrics since the last take (then cleared): per layer max/mean expert load and the dropped
        share of the assignments; over layers the largest max/mean, the dropped share, and the mean
        aux and z losses per forward. reduce (a sum of a float64 tensor on `device` over the ranks
        that route other tokens or hold other layers: the data-parallel and pipeline groups) makes
        them global."""
        layers = self.layers or sorted(self.load)
        device = device or next((t.device for t in self.load.values()), torch.device("cpu"))
        zeros = torch.zeros(self.num_experts or 1, dtype=torch.float64, device=device)
        parts = [t for i in layers for t in (self.load[i].double() if i in self.load else zeros,
                                             self.dropped[i].double().view(1) if i in self.dropped
                                             else zeros[:1])]
        for values in self.losses.values():
            parts.append(torch.stack([torch.stack(values).double().sum(),
                                      torch.tensor(float(len(values)), dtype=torch.float64, device=device)])
                         if values else torch.zeros(2, dtype=torch.float64, device=device))
        flat = torch.cat([p.to(device) for p in parts])  # one tensor: one collective
        if reduce is not None:
            reduce(flat)
        flat = flat.cpu()
        out: dict[str, float] = {}
        ratios, dropped, assigned, at = [], 0.0, 0.0, 0
        for layer in layers:
            E = self.load[layer].numel() if layer in self.load else zeros.numel()
            load, d = flat[at:at + E], float(flat[at + E])  # (E,), assignments dropped
            at += E + 1
            if not load.sum():  # no forward reached this layer since the last take
                continue
            ratios.append(float(load.max() / load.mean().clamp_min(1e-12)))
            out[f"moe/layer{layer}/load_max_over_mean"] = ratios[-1]
            out[f"moe/layer{layer}/dropped"] = d / max(float(load.sum()), 1.0)
            dropped, assigned = dropped + d, assigned + float(load.sum())
        if ratios:
            out["moe/load_max_over_mean"] = max(ratios)
            out["moe/dropped"] = dropped / max(assigned, 1.0)
        for name in self.losses:
            total, count = float(flat[at]), float(flat[at + 1])
            at += 2
            if count:
                out[f"moe/{name}"] = total / count
        self._clear()
        return out


def _in_backward() -> bool:
    """True while autograd runs a backward: a block recomputed by activation checkpointing runs its
    forward again there, and must not count its tokens twice."""
    return torch._C._current_graph_task_id() != -1


class AddAuxLoss(torch.autograd.Function):
    """Forward: y unchanged. Backward: y's gradient, and the gradient of scale x loss for loss's
    graph (the router), as if loss had been added to the objective (Megatron's aux-loss scaler)."""

    @staticmethod
    def forward(ctx, y, loss, stats: RouterStats):
        ctx.stats = stats
        ctx.loss_shape = loss.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        scale = torch.full(ctx.loss_shape, ctx.stats.scale, dtype=torch.float32, device=grad.device)
        return grad, scale, None


def _grouped_mm_usable(*tensors: torch.Tensor) -> bool:
    """Whether torch._grouped_mm (torch >= 2.8; bf16 on Hopper-class GPUs, fp32/bf16 on CPU) takes
    these operands: one dtype, every row stride and start address a multiple of 16 bytes, and a
    probe of the three forms GroupedLinear calls succeeding once per (device type, dtype)."""
    if not hasattr(torch, "_grouped_mm") or len({t.dtype for t in tensors}) != 1:
        return False
    if any(t.data_ptr() % 16 or (t.shape[-1] * t.element_size()) % 16 for t in tensors):
        return False
    t = tensors[0]
    key = (t.device.type, t.dtype)
    if key not in _PROBED:
        try:
            x = torch.ones(4, 8, device=t.device, dtype=t.dtype)  # (M, K)
            w = torch.ones(2, 8, 8, device=t.device, dtype=t.dtype)  # (E, N, K)
            offs = torch.tensor([1, 4], device=t.device, dtype=torch.int32)
            y = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)  # forward (M, N)
            torch._grouped_mm(y, w, offs=offs)  # input gradient (M, K)
            torch._grouped_mm(y.t(), x, offs=offs)  # weight gradient (E, N, K)
            _PROBED[key] = True
        except (RuntimeError, NotImplementedError):
            _PROBED[key] = False
    return _PROBED[key]


_PROBED: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> torch._grouped_mm works


class GroupedLinear(torch.autograd.Function):
    """x (M, K) rows grouped by expert, w (E, N, K) stacked nn.Linear weights, offs (E,) int32 end
    row of each group -> (M, N): row block e times w[e]^T, all groups in one torch._grouped_mm; the
    backward is two more (input gradient: grad (M, N) x w[e]; weight gradient: grad^T x x summed
    over each group's rows). Written out rather than left to autograd so that the gradient handed
    in is made contiguous (the kernel refuses an expanded one) and an expert without rows gets an
    exact zero gradient (some GPU kernels leave that block unwritten). Nothing here waits for the
    device: the group sizes stay a tensor."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        if not x.shape[0]:  # no rows at all (an expert-parallel rank sent nothing): an empty GEMM
            return x.new_empty(0, w.shape[1])
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)  # (M, N)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        if not x.shape[0]:
            return x.new_empty(x.shape), torch.zeros_like(w), None
        grad = grad.contiguous()  # (M, N)
        grad_x = torch._grouped_mm(grad, w, offs=offs) if ctx.needs_input_grad[0] else None  # (M, K)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(grad.t(), x, offs=offs)  # (E, N, K)
            empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0  # (E,) experts without rows
            grad_w.masked_fill_(empty.view(-1, 1, 1), 0)
        return grad_x, grad_w, None


def _activation(h: torch.Tensor, swiglu: bool, gelu_approximate: str) -> torch.Tensor:
    """(n, 2I | I) -> (n, I): the expert MLP's nonlinearity."""
    if swiglu:
        gate, up = h.chunk(2, dim=-1)  # (n, I) each
        return F.silu(gate) * up  # (n, I)
    return F.gelu(h, approximate=gelu_approximate)  # (n, I)


def grouped_mlp(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, counts: torch.Tensor,
                swiglu: bool, gelu_approximate: str, grouped: bool = True) -> torch.Tensor:
    """x (M, C) rows grouped by expert (counts[e] rows for expert e, in order; counts an (E,) tensor),
    fc1 (E, 2I | I, C), fc2 (E, C, I) -> (M, C): each group through its expert's MLP.

    grouped (and torch._grouped_mm usable for these operands): two grouped GEMMs for all experts,
    without reading counts on the host. Otherwise one loop over the experts, two GEMMs each (the
    reference); an expert without rows still runs its (empty) GEMMs there. Either way the output
    stays in the graph of the weights and of x, so a backward always reaches whatever produced x
    (expert parallelism's all-to-all, which every rank must join)."""
    if grouped and _grouped_mm_usable(x, fc1, fc2):
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        h = _activation(GroupedLinear.apply(x, fc1, offs), swiglu, gelu_approximate)  # (M, I)
        return GroupedLinear.apply(h.contiguous(), fc2, offs)  # (M, C)
    outs = []
    for e, rows in enumerate(x.split(counts.tolist())):  # rows (counts[e], C)
        h = _activation(F.linear(rows, fc1[e]), swiglu, gelu_approximate)  # (n, I)
        outs.append(F.linear(h, fc2[e]))  # (n, C)
    return torch.cat(outs)


class Experts(nn.Module):
    """E expert MLPs (no biases), stacked so expert parallelism can slice them along dim 0."""

    def __init__(self, cfg: ModelConfig, num_experts: int, inter: int):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.gelu_approximate = "none" if cfg.activation == "gelu_exact" else "tanh"
        C = cfg.hidden_size
        self.fc1 = nn.Parameter(torch.empty(num_experts, inter * (2 if self.swiglu else 1), C))
        self.fc2 = nn.Parameter(torch.empty(num_experts, C, inter))
        self.grouped = cfg.moe.grouped_gemm

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_mlp(x, self.fc1, self.fc2, counts, self.swiglu, self.gelu_approximate, self.grouped)


def shared_config(cfg: ModelConfig) -> ModelConfig | None:
    """The dense MLP the shared experts form (their summed width, no biases), or None."""
    m = cfg.moe
    if not m.num_shared_experts:
        return None
    return dataclasses.replace(cfg, intermediate_size=m.shared_intermediate_size, bias=False, dropout=0.0,
                               moe=None)


class MoE(nn.Module):
    """The MoE MLP of block `layer`: (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig, layer: int, stats: RouterStats, shared: nn.Module | None = None):
        """shared: the shared experts, a dense MLP of shared_config(cfg) (model.gpt.Block builds it)."""
        super().__init__()
        m = cfg.moe
        self.layer, self.stats = layer, stats
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.sigmoid = m.router == "sigmoid"
        self.norm_topk = m.norm_topk_prob or self.sigmoid
        self.aux_coeff, self.z_coeff = m.aux_loss_coeff, m.z_loss_coeff
        self.capacity_factor = m.capacity_factor
        self.bias_rate = m.bias_update_rate
        self.router = nn.Linear(cfg.hidden_size, m.num_experts, bias=False)
        self.experts = Experts(cfg, m.num_experts, m.intermediate_size)
        self.shared = shared
        self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if m.shared_expert_gate else None
        # not trained (no gradient, no optimizer state): moved by update_bias; a parameter so that
        # checkpoints, which store parameters, keep it
        self.expert_bias = nn.Parameter(torch.zeros(m.num_experts), requires_grad=False)
        self.drop = Dropout(cfg.dropout)  # on the output, as the dense MLP's
        self.recompute_act = False  # set by GPT.set_recompute; the experts keep their activations
        # tokens per expert since the last update_bias (E,), this rank's: a step's count, not state
        # (no buffer: made on the activations' device by the first forward)
        self.load_since_update: torch.Tensor | None = None
        # When the micro-batch's tokens are split over ranks (context parallelism, and sequence
        # parallelism's tp ranks, call add_token_shards from outside): the balancing loss's
        # assignment shares f_e are the whole micro-batch's, summed over the `sequence_shards` ranks
        # by sum_over_shards (no gradient); the mean scores P_e and the z-loss's mean stay this
        # rank's. Their gradients must add up to the serial ones over those ranks: the data-parallel
        # mean averages them over cp; over tp, where the gradients are summed, loss_share = 1 / tp.
        self.sequence_shards = 1
        self.sum_over_shards = None
        self.loss_share = 1.0

    def add_token_shards(self, shards: int, reduce, loss_share: float = 1.0) -> None:
        """The micro-batch's tokens are split over `shards` more ranks, whose sum `reduce` computes
        (in place or returned); their auxiliary losses' gradients are weighted by loss_share."""
        before = self.sum_over_shards
        self.sequence_shards *= shards
        self.sum_over_shards = reduce if before is None else (lambda t: reduce(before(t)))
        self.loss_share *= loss_share

    def route(self, x: torch.Tensor):
        """x (N, C) -> (logits (N, E) fp32, scores (N, E) fp32, chosen (N, k), weights (N, k) fp32)."""
        logits = F.linear(x, self.router.weight).float()  # (N, E)
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)  # (N, E)
        choice = scores + self.expert_bias if self.bias_rate > 0 else scores  # (N, E)
        chosen = torch.topk(choice, self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, chosen)  # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k)
        return logits, scores, chosen, weights

    def keep_mask(self, chosen: torch.Tensor) -> torch.Tensor | None:
        """(N, k) bool: which assignments the experts' capacity takes (token order, then choice
        order); None when dropless."""
        if self.capacity_factor is None:
            return None
        N = chosen.shape[0]
        capacity = math.ceil(self.capacity_factor * N * self.top_k / self.num_experts)
        flat = chosen.flatten()  # (N k,) token-major: token 0's choices, then token 1's, ...
        onehot = F.one_hot(flat, self.num_experts)  # (N k, E)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # (N k,) its place in its expert's queue
        return (position < capacity).view(N, self.top_k)

    def losses(self, logits, scores, chosen):
        """(aux, z) as tensors with grad (None where the coefficient is 0)."""
        aux = z = None
        if self.aux_coeff > 0:
            N, E = scores.shape
            counts = torch.bincount(chosen.flatten(), minlength=E).to(scores.dtype)  # (E,)
            if self.sum_over_shards is not None:
                counts = self.sum_over_shards(counts)  # (E,) the whole micro-batch's
            f = counts / (N * self.sequence_shards * self.top_k)  # (E,) share of the assignments
            p = scores / scores.sum(-1, keepdim=True) if self.sigmoid else scores  # (N, E)
            aux = E * (f * p.mean(0)).sum()
        if self.z_coeff > 0:
            z = torch.logsumexp(logits, dim=-1).square().mean()
        return aux, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        logits, scores, chosen, weights = self.route(flat)
        keep = self.keep_mask(chosen)  # (N, k) or None
        if keep is not None:
            weights = weights * keep  # dropped assignments add nothing
        # group the N k assignments by expert: a stable sort keeps token order inside each expert
        order = torch.argsort(chosen.flatten(), stable=True)  # (N k,)
        if keep is not None:
            order = order[keep.flatten()[order]]  # dropped ones never reach their expert
        token = order // self.top_k  # (M,) the token of each kept assignment
        counts = torch.bincount(chosen.flatten()[order], minlength=self.num_experts)  # (E,)
        y = self.experts(flat[token], counts)  # (M, C)
        y = y * weights.flatten()[order, None].to(y.dtype)  # (M, C)
        out = torch.zeros_like(flat).index_add_(0, token, y)  # (N, C)
        if self.shared is not None:
            s = self.shared(flat)  # (N, C)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(flat)) * s  # (N, C)
            out = out + s
        out = self.drop(out.view(B, T, C))  # (B, T, C)
        if self.training and torch.is_grad_enabled():  # the losses and metrics only where one trains
            aux, z = self.losses(logits, scores, chosen)
            if not _in_backward():
                load = torch.bincount(chosen.flatten(), minlength=self.num_experts)  # (E,) before dropping
                seen = self.load_since_update
                self.load_since_update = load if seen is None else seen + load
                self.stats.record(self.layer, load, chosen.numel() - counts.sum(), aux, z)
            total = sum(c * t for c, t in ((self.aux_coeff, aux), (self.z_coeff, z)) if t is not None)
            if torch.is_tensor(total):
                out = AddAuxLoss.apply(out, total * self.loss_share if self.loss_share != 1 else total,
                                       self.stats)
        return out  # (B, T, C)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing, after an optimizer step: each expert's bias moves by
        bias_update_rate towards the mean load (up if it was under-loaded). `load` (E,): the step's
        tokens per expert over every rank that routes (summed by the caller); default this layer's
        own count since the last update."""
        if load is None:
            load = self.load_since_update if self.load_since_update is not None else torch.zeros(1)
        load = load.double()  # (E,)
        if self.bias_rate > 0 and load.sum() > 0:
            self.expert_bias.add_(self.bias_rate * torch.sign(load.mean() - load).to(self.expert_bias))
        self.load_since_update = None
