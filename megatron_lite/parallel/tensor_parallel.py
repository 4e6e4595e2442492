"""parallelize(model, group): the serial GPT -> its tensor-parallel form, by a plan keyed by
module name, slicing the serial model's own weights (so TP=1 and TP=N start identical).

The plan (Megatron's):
    tok_emb              VocabParallelEmbedding (vocab padded to tp * make_vocab_divisible_by)
    blocks.*.attn.qkv    ColumnParallelLinear: each rank takes its heads of q, of k and of v
    blocks.*.attn.proj   RowParallelLinear (bias added once, after the reduction)
    blocks.*.mlp.fc1     ColumnParallelLinear (SwiGLU: its slice of the gate and of the up half)
    blocks.*.mlp.fc2     RowParallelLinear
    lm_head              VocabParallelHead: column-parallel logits + vocab-parallel cross-entropy
    norms, pos_emb       replicated
With sequence parallelism, the residual stream between blocks is split along the sequence:
embeddings are scattered, column-parallel layers all-gather their input, row-parallel layers
reduce-scatter their output, and norm weights / row biases (which then see only a shard) get
their gradients all-reduced over tp by sync_sequence_parallel_grads().

shard(name, full) is the single slicing rule: parallelize uses it on weights, and tests use it on
serial gradients to compare every gradient slice.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import comm
from ..model.gpt import GPT
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, mark, padded_vocab,
                     tp_shard)
from .mappings import copy_to_tp, gather_from_sp, gather_from_tp, scatter_to_sp
from .random import RNGTracker


class TPSharder:
    """Slices full (serial) tensors into this rank's shard, by global parameter name."""

    def __init__(self, model_cfg, group, make_vocab_divisible_by: int = 128):
        self.cfg = model_cfg
        self.group = group
        self.tp = comm.size(group)
        self.rank = comm.rank(group)
        self.vocab = model_cfg.vocab_size
        self.padded_vocab = padded_vocab(self.vocab, self.tp, make_vocab_divisible_by)
        self.vocab_start = self.rank * self.padded_vocab // self.tp

    def vocab_rows(self, t: torch.Tensor) -> torch.Tensor:
        pad = self.padded_vocab - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros((pad,) + t.shape[1:])])  # padded rows: never used, zero
        return tp_shard(t, self.group, 0)

    def qkv_rows(self, t: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        parts = t.split([c.num_attention_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                         c.num_kv_heads * c.head_dim])
        return torch.cat([tp_shard(p, self.group, 0) for p in parts])

    def halves_rows(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([tp_shard(p, self.group, 0) for p in t.chunk(2)])

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The shard of global parameter `name` (replicated parameters come back whole)."""
        if name in ("tok_emb.weight", "lm_head.weight", "parallel_head.weight"):
            return self.vocab_rows(t)
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            return self.qkv_rows(t)
        if name.endswith(("mlp.fc1.weight", "mlp.fc1.bias")):
            return self.halves_rows(t) if self.cfg.activation == "swiglu" else tp_shard(t, self.group, 0)
        if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            return tp_shard(t, self.group, 1)
        return t


def consolidate(shards: list[dict[str, torch.Tensor]], model_cfg, make_vocab_divisible_by: int) -> dict:
    """Inverse of TPSharder: the serial state dict from the tp ranks' shards (rank order)."""
    c, tp = model_cfg, len(shards)
    out = {}
    for name, first in shards[0].items():
        parts = [s[name] for s in shards]
        serial = "lm_head.weight" if name == "parallel_head.weight" else name
        if serial in ("tok_emb.weight", "lm_head.weight"):
            t = torch.cat(parts)[:c.vocab_size]  # drop the padded rows
        elif name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            h, k = c.num_attention_heads // tp * c.head_dim, c.num_kv_heads // tp * c.head_dim
            split = [p.split([h, k, k]) for p in parts]
            t = torch.cat([torch.cat([sp[i] for sp in split]) for i in range(3)])
        elif name.endswith(("mlp.fc1.weight", "mlp.fc1.bias")) and c.activation == "swiglu":
            halves = [p.chunk(2) for p in parts]
            t = torch.cat([torch.cat([hv[i] for hv in halves]) for i in range(2)])
        elif name.endswith(("mlp.fc1.weight", "mlp.fc1.bias")):
            t = torch.cat(parts)
        elif name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            t = torch.cat(parts, dim=1)
        else:
            t = first  # replicated
        out[serial] = t
    if c.tie_embeddings and "tok_emb.weight" in out:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


class ForkedDropout(nn.Dropout):
    """Dropout drawn from the tensor-parallel RNG stream (activations that differ per tp rank)."""

    def __init__(self, p: float, tracker: RNGTracker):
        super().__init__(p)
        self.tracker = tracker

    def forward(self, x):
        with self.tracker.fork():
            return super().forward(x)


class ScatterThenDropout(nn.Module):
    """Under sequence parallelism: split the embeddings along the sequence, then drop out."""

    def __init__(self, group, dropout: nn.Module):
        super().__init__()
        self.group = group
        self.dropout = dropout
        self.sequence_parallel = True

    def forward(self, x):
        return self.dropout(scatter_to_sp(x, self.group) if self.sequence_parallel else x)


class VocabParallelHead(nn.Module):
    """Column-parallel LM head over the padded vocabulary + vocab-parallel cross-entropy.
    With labels, returns (None, loss) and never gathers the logits; without, the full logits."""

    def __init__(self, weight: nn.Parameter, sharder: TPSharder, sequence_parallel: bool):
        super().__init__()
        self.weight = weight  # (padded_vocab / tp, C); the embedding's own Parameter when tied
        self.group = sharder.group
        self.vocab_size = sharder.vocab
        self.vocab_start = sharder.vocab_start
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None):
        x = gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        logits = F.linear(x, self.weight)  # (B, T, padded_vocab / tp)
        if labels is not None:
            loss = vocab_parallel_cross_entropy(logits.flatten(0, 1), labels.flatten(), self.vocab_start,
                                                self.vocab_size, self.group)
            return None, loss
        return gather_from_tp(logits, self.group)[..., :self.vocab_size], None


@torch.no_grad()
def parallelize(model: GPT, group, sequence_parallel: bool = False, make_vocab_divisible_by: int = 128,
                tracker: RNGTracker | None = None) -> GPT:
    """Turn `model` (serial, any device) into its tensor-parallel form over `group`, in place."""
    cfg = model.config
    sp = sequence_parallel
    sharder = TPSharder(cfg, group, make_vocab_divisible_by)
    tp = sharder.tp
    if tracker is None:
        tracker = RNGTracker(0, sharder.rank, next(model.parameters()).device)
    full = dict(model.named_parameters(remove_duplicate=False))

    emb = None
    if model.has_embed:
        emb = VocabParallelEmbedding(sharder("tok_emb.weight", full["tok_emb.weight"]), sharder.vocab_start, group)
        model.tok_emb = emb
    if model.has_head:
        tied_here = cfg.tie_embeddings and emb is not None
        head_weight = emb.weight if tied_here else \
            mark(nn.Parameter(sharder("lm_head.weight", full["lm_head.weight"])), tensor_parallel=True)
        model.lm_head = None
        model.parallel_head = VocabParallelHead(head_weight, sharder, sp)
    model.fused_loss = False

    def linear(kind, prefix, **kw):
        w = sharder(prefix + ".weight", full[prefix + ".weight"])
        b = full.get(prefix + ".bias")
        if b is not None:
            b = sharder(prefix + ".bias", b).clone()
        return kind(w.clone(), b, group, sequence_parallel=sp, **kw)

    for i, block in model.blocks.items():
        p = f"blocks.{i}"
        block.attn.qkv = linear(ColumnParallelLinear, f"{p}.attn.qkv")
        block.attn.proj = linear(RowParallelLinear, f"{p}.attn.proj")
        block.attn.n_head //= tp
        block.attn.n_kv //= tp
        block.attn.core_rng = tracker.fork  # local heads: a per-rank dropout stream
        block.mlp.fc1 = linear(ColumnParallelLinear, f"{p}.mlp.fc1")
        block.mlp.fc2 = linear(RowParallelLinear, f"{p}.mlp.fc2")
        if sp:
            block.attn.resid_drop = ForkedDropout(cfg.dropout, tracker)
            block.mlp.drop = ForkedDropout(cfg.dropout, tracker)
            for norm in (block.ln1, block.ln2):
                for param in norm.parameters():
                    mark(param, sequence_parallel=True)
    if sp and model.has_head:
        for param in model.ln_f.parameters():
            mark(param, sequence_parallel=True)
    if sp and model.has_embed:
        model.drop = ScatterThenDropout(group, ForkedDropout(cfg.dropout, tracker))
    model.tp_group = group
    model.tp_sharder = sharder
    model.rng_tracker = tracker
    return model


def set_sequence_parallel(model: nn.Module, on: bool) -> None:
    """Switch sequence parallelism of a parallelized model on or off (off for decoding, whose
    one-token steps cannot be split along the sequence). The weights are the same either way."""
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelHead, ScatterThenDropout)):
            m.sequence_parallel = on


def sync_sequence_parallel_grads(model: nn.Module, group) -> None:
    """Sum over tp the grads of replicated params that saw only a sequence shard: one bucket."""
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads or comm.size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group)
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, group, pp_group=None,
                    duplicates: tuple[torch.Tensor, ...] = ()) -> float:
    """Global L2 norm of all grads: tp-sharded params summed over tp, replicated params counted
    once, every pipeline stage's share summed over pp; `duplicates` (e.g. the last stage's copy of
    a tied embedding) are scaled but not counted. Scales grads in place when the norm exceeds
    max_norm; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    acc = torch.promote_types(params[0].grad.dtype if params else torch.float32, torch.float32)  # fp64 in tests
    sharded = torch.zeros((), dtype=acc, device=device)
    replicated = torch.zeros((), dtype=acc, device=device)
    skip = {id(d) for d in duplicates}
    for p in params:
        if id(p) in skip:
            continue
        sq = p.grad.detach().to(acc).pow(2).sum()
        if getattr(p, "tensor_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if group is not None:
        comm.all_reduce(sharded, group)
    total = sharded + replicated
    if pp_group is not None:
        comm.all_reduce(total, pp_group)
    norm = math.sqrt(total.item())
    if max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.detach().mul_(coef)
    return norm
