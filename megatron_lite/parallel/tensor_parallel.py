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

slicing_table() is the single slicing rule, by global parameter name: TPSharder applies it to
serial weights (parallelize) and gradients (tests), consolidate() inverts it (checkpoints, generate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import comm
from ..model.gpt import GPT
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, mark, padded_vocab
from .mappings import copy_to_tp, gather_from_sp, gather_from_tp, scatter_to_sp
from .random import RNGTracker


@dataclass(frozen=True)
class Split:
    """How tensor parallelism divides one parameter: along `dim`, each fused block (sizes in the
    full tensor, e.g. q | k | v) split separately so every rank keeps a slice of each; `vocab` rows
    are first padded to the padded vocabulary (and trimmed again when consolidating)."""
    dim: int = 0
    blocks: tuple[int, ...] = ()  # () = one block, the whole dimension
    vocab: bool = False
    labels: tuple[str, ...] = ()  # names of the blocks (checkpoints store each block on its own)


def slicing_table(cfg) -> list[tuple[tuple[str, ...], Split]]:
    """The one slicing table, keyed by (suffixes of) global parameter names; used to shard the
    serial weights (parallelize, tests) and to consolidate shards back (checkpoints, generate).
    Parameters it does not name (norms, pos_emb, row-parallel biases) are replicated."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    width = cfg.intermediate_size
    return [
        (("tok_emb.weight", "lm_head.weight"), Split(0, vocab=True)),  # VocabParallelEmbedding / head
        (("attn.qkv.weight", "attn.qkv.bias"), Split(0, (q, kv, kv), labels=("q", "k", "v"))),  # fused
        (("mlp.fc1.weight", "mlp.fc1.bias"),
         Split(0, (width, width), labels=("gate", "up")) if cfg.activation == "swiglu" else Split(0)),
        (("attn.proj.weight", "mlp.fc2.weight"), Split(1)),  # row-parallel: input columns
    ]


def split_of(name: str, cfg) -> Split | None:
    """The table's entry for global parameter `name`; None if it is replicated."""
    name = "lm_head.weight" if name == "parallel_head.weight" else name
    for suffixes, split in slicing_table(cfg):
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return split
    return None


def shard_tensor(t: torch.Tensor, split: Split, rank: int, tp: int, padded: int) -> torch.Tensor:
    """Rank `rank`'s slice of the full tensor t."""
    if split.vocab and padded > t.shape[0]:
        t = torch.cat([t, t.new_zeros((padded - t.shape[0],) + t.shape[1:])])  # padded rows: never used
    blocks = t.split(list(split.blocks), split.dim) if split.blocks else (t,)
    return torch.cat([b.chunk(tp, split.dim)[rank] for b in blocks], split.dim).contiguous()


def unshard_tensor(parts: list[torch.Tensor], split: Split, vocab_size: int) -> torch.Tensor:
    """The full tensor from every rank's slice (rank order): the inverse of shard_tensor."""
    tp = len(parts)
    local = [b // tp for b in split.blocks] if split.blocks else [parts[0].shape[split.dim]]
    per_rank = [p.split(local, split.dim) for p in parts]
    t = torch.cat([torch.cat([r[i] for r in per_rank], split.dim) for i in range(len(local))], split.dim)
    return t[:vocab_size] if split.vocab else t


class TPSharder:
    """Slices full (serial) tensors into one tp rank's shard, by global parameter name."""

    def __init__(self, model_cfg, tp: int, rank: int, make_vocab_divisible_by: int = 128):
        self.cfg = model_cfg
        self.tp, self.rank = tp, rank
        self.vocab = model_cfg.vocab_size
        self.padded_vocab = padded_vocab(self.vocab, tp, make_vocab_divisible_by)
        self.vocab_start = rank * self.padded_vocab // tp

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The shard of global parameter `name` (replicated parameters come back whole)."""
        split = split_of(name, self.cfg)
        return t if split is None else shard_tensor(t, split, self.rank, self.tp, self.padded_vocab)


def consolidate(shards: list[dict[str, torch.Tensor]], model_cfg) -> dict:
    """The serial state dict from the tp ranks' shards (rank order), by the same slicing table."""
    out = {}
    for name, first in shards[0].items():
        serial = "lm_head.weight" if name == "parallel_head.weight" else name
        split = split_of(serial, model_cfg)
        out[serial] = first if split is None else \
            unshard_tensor([s[name] for s in shards], split, model_cfg.vocab_size)
    if model_cfg.tie_embeddings and "tok_emb.weight" in out:
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

    def __init__(self, weight: nn.Parameter, sharder: TPSharder, group, sequence_parallel: bool):
        super().__init__()
        self.weight = weight  # (padded_vocab / tp, C); the embedding's own Parameter when tied
        self.group = group
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


@dataclass
class TensorParallel:
    """What parallelize() made: the model (changed in place), its tp group, the sharder that slices
    serial tensors the way this rank holds them, and the dropout stream of the tp regions."""
    model: GPT
    group: object
    sharder: TPSharder
    tracker: RNGTracker
    sequence_parallel: bool


@torch.no_grad()
def parallelize(model: GPT, group, sequence_parallel: bool = False, make_vocab_divisible_by: int = 128,
                tracker: RNGTracker | None = None) -> TensorParallel:
    """Turn `model` (serial, any device) into its tensor-parallel form over `group`, in place."""
    cfg = model.config
    sp = sequence_parallel
    sharder = TPSharder(cfg, comm.size(group), comm.rank(group), make_vocab_divisible_by)
    tp = sharder.tp
    if tracker is None:
        tracker = RNGTracker(0, sharder.rank, next(model.parameters()).device)
    full = dict(model.named_parameters(remove_duplicate=False))

    emb = None
    if model.has_embed:
        emb = VocabParallelEmbedding(sharder("tok_emb.weight", full["tok_emb.weight"]), sharder.vocab_start,
                                     group)
        model.tok_emb = emb
    if model.has_head:
        tied_here = cfg.tie_embeddings and emb is not None
        head_weight = emb.weight if tied_here else \
            mark(nn.Parameter(sharder("lm_head.weight", full["lm_head.weight"])), tensor_parallel=True)
        model.lm_head = None
        model.parallel_head = VocabParallelHead(head_weight, sharder, group, sp)
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
    return TensorParallel(model, group, sharder, tracker, sp)


def set_sequence_parallel(model: nn.Module, on: bool) -> None:
    """Switch sequence parallelism of a parallelized model on or off (off for decoding, whose
    one-token steps cannot be split along the sequence). The weights are the same either way."""
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelHead, ScatterThenDropout)):
            m.sequence_parallel = on
