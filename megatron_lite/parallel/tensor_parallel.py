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
    blocks.*.mlp (MoE)   replicated (its experts split over ep instead, parallel/expert_parallel.py):
                         without SP every tp rank runs the MoE block on the whole sequence; with SP
                         each routes and computes only its sequence shard, the tokens it holds
                         anyway (no collective around the block), and the MoE parameters' gradients
                         are summed over tp like the norms' (Megatron's sequence-parallel MoE)
With sequence parallelism, the residual stream between blocks is split along the sequence:
embeddings are scattered, column-parallel layers all-gather their input, row-parallel layers
reduce-scatter their output, and norm weights / row biases (which then see only a shard) get
their gradients all-reduced over tp by sync_sequence_parallel_grads().

The slicing itself (which rows or columns of which parameter a rank holds) is pure arithmetic in
megatron_lite/slicing.py, shared with checkpoints, verify, plan and the tests. The head is
installed as `lm_head`, so a tensor-parallel model's parameters keep their serial names.

parallelize() only rearranges modules and slices tensors, so it runs on a meta-device model too.
build_stage() uses that: the stage is built and parallelized on the meta device, then each
parameter is materialised from its full master_init value, sliced by the same sharder, one full
parameter at a time. A rank never holds its whole serial stage (at 405B that alone is over 80 GB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..distributed import comm
from ..model.activations import Dropout
from ..model.gpt import GPT
from ..model.init import init_source, master_init
from ..model.moe import MoE
from ..slicing import TPSharder
from .cross_entropy import vocab_parallel_cross_entropy
from .expert_parallel import apply_expert_parallel
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, gather_linear, mark
from .mappings import copy_to_tp, gather_from_tp, scatter_to_sp
from .random import RNGTracker


class ForkedDropout(Dropout):
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
        if self.sequence_parallel:  # keeps only the sequence shard of x for backward
            logits = gather_linear(x, self.weight, None, self.group)  # (B, T, padded_vocab / tp)
        else:
            logits = F.linear(copy_to_tp(x, self.group), self.weight)  # (B, T, padded_vocab / tp)
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
    # the serial model's parameter shapes (tied copies under both names): what the sharder slices
    serial_shapes: dict[str, torch.Size] = field(default_factory=dict)


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
    serial_shapes = {name: p.shape for name, p in full.items()}

    emb = None
    if model.has_embed:
        emb = VocabParallelEmbedding(sharder("tok_emb.weight", full["tok_emb.weight"]), sharder.vocab_start,
                                     group)
        model.tok_emb = emb
    if model.has_head:
        tied_here = cfg.tie_embeddings and emb is not None
        head_weight = emb.weight if tied_here else \
            mark(nn.Parameter(sharder("lm_head.weight", full["lm_head.weight"])), tensor_parallel=True)
        model.lm_head = VocabParallelHead(head_weight, sharder, group, sp)  # same name, same signature

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
        if not isinstance(block.mlp, MoE):  # a MoE block stays whole on every tp rank (experts: ep)
            block.mlp.fc1 = linear(ColumnParallelLinear, f"{p}.mlp.fc1")
            block.mlp.fc2 = linear(RowParallelLinear, f"{p}.mlp.fc2")
        elif sp:
            shard_moe_tokens(block.mlp, group)
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
    return TensorParallel(model, group, sharder, tracker, sp, serial_shapes)


def shard_moe_tokens(moe: MoE, group) -> None:
    """Sequence-parallel MoE: the block's input is this tp rank's sequence shard, which it routes and
    runs through the (replicated) experts itself. Each parameter then sees 1/tp of the tokens, so its
    gradient is summed over tp (the sequence_parallel mark, as for the norms); the balancing loss
    counts the assignments of every shard, and its and the z-loss's gradients are weighted 1/tp so
    that their sum over tp is the serial one."""
    tp = comm.size(group)
    for param in moe.parameters():
        if param.requires_grad:
            mark(param, sequence_parallel=True)
    moe.add_token_shards(tp, lambda t: comm.all_reduce(t, group), loss_share=1.0 / tp)


def set_sequence_parallel(model: nn.Module, on: bool) -> None:
    """Switch sequence parallelism of a parallelized model on or off (off for decoding, whose
    one-token steps cannot be split along the sequence). The weights are the same either way."""
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelHead, ScatterThenDropout)):
            m.sequence_parallel = on


@torch.no_grad()
def materialize(model: GPT, seed: int, device, tp: TensorParallel | None = None,
                sharder: TPSharder | None = None, serial_shapes: dict | None = None) -> None:
    """Give every meta parameter and buffer of `model` (a stage built on the meta device, then
    parallelized into `tp` if given, its experts sliced by expert parallelism if `sharder` says so)
    its storage on `device` and its initial value: the full master_init tensor of the parameter (on
    CPU), sliced by the sharder that cut it (`sharder`, else tp's), so the values are those of
    building the serial stage and slicing it. Only one full parameter exists at a time, and only on
    CPU; the device receives the shards. Parameter objects are replaced, keeping their attributes
    (tensor_parallel, sequence_parallel, expert_parallel) and ties (one object under two names).
    serial_shapes: the serial stage's parameter shapes (default tp's)."""
    sharder = sharder or (tp.sharder if tp is not None else None)
    serial_shapes = serial_shapes or (tp.serial_shapes if tp is not None else None)
    cfg = model.config
    made: dict[int, nn.Parameter] = {}  # id(meta parameter) -> its materialised Parameter
    for prefix, module in model.named_modules():
        for key, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:  # a tied parameter is drawn once, under its first name (tok_emb)
                name = f"{prefix}.{key}" if prefix else key
                shape = serial_shapes[name] if serial_shapes is not None else p.shape
                full = master_init(init_source(name, cfg, model.has_embed), shape, cfg, seed)
                local = sharder(name, full) if sharder is not None else full
                if local.shape != p.shape:  # the sharder is not the slicing parallelize() did
                    raise RuntimeError(f"{name}: materialised {tuple(local.shape)}, the module holds "
                                       f"{tuple(p.shape)}")
                new = nn.Parameter(local.to(device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)  # the marks parallelize() set
                made[id(p)] = new
                del full, local  # before the next parameter's full tensor exists
            module._parameters[key] = made[id(p)]
    # Buffers are derived from the config (RoPE's cos/sin): a CPU GPT with no pieces computes them
    # exactly as the serial build does before moving them to the device.
    with torch.device("cpu"):
        derived = dict(GPT(cfg, seed=None, layers=[], embed=False, head=False).named_buffers())
    for prefix, module in model.named_modules():
        for key, b in list(module._buffers.items()):
            if b is None or not b.is_meta:
                continue
            name = f"{prefix}.{key}" if prefix else key
            if name not in derived:
                raise RuntimeError(f"no rule to materialise buffer {name}")
            module._buffers[key] = derived[name].to(device)


def build_stage(cfg: ModelConfig, seed: int, layers, embed: bool, head: bool, device, group=None,
                sequence_parallel: bool = False, make_vocab_divisible_by: int = 128,
                tracker: RNGTracker | None = None, ep_group=None) -> tuple[GPT, TensorParallel | None]:
    """One rank's stage (`layers`, the embedding, the head), tensor-parallel over `group` when it has
    more than one rank, its experts split over `ep_group` (expert parallelism) when that has more
    than one: built, parallelized and its experts sliced on the meta device, then materialised on
    `device` from the master values. Bit-identical to build_stage_unsliced (then
    apply_expert_parallel), holding the shards only: at Mixtral 8x7B a rank never holds the 45B
    parameters of every expert."""
    with torch.device("meta"):
        model = GPT(cfg, seed=None, layers=layers, embed=embed, head=head)
    serial_shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    tp = None
    if group is not None and comm.size(group) > 1:
        if tracker is None:  # parallelize would place it on the model's (meta) device
            tracker = RNGTracker(0, comm.rank(group), torch.device(device))
        tp = parallelize(model, group, sequence_parallel=sequence_parallel,
                         make_vocab_divisible_by=make_vocab_divisible_by, tracker=tracker)
    ep = comm.size(ep_group) if ep_group is not None else 1
    if ep > 1:
        apply_expert_parallel(model, ep_group)
    sharder = TPSharder(cfg, tp.sharder.tp if tp else 1, tp.sharder.rank if tp else 0,
                        make_vocab_divisible_by, ep, comm.rank(ep_group) if ep > 1 else 0)
    materialize(model, seed, device, tp, sharder, serial_shapes)
    return model, tp


def build_stage_unsliced(cfg: ModelConfig, seed: int, layers, embed: bool, head: bool, device, group=None,
                         sequence_parallel: bool = False, make_vocab_divisible_by: int = 128,
                         tracker: RNGTracker | None = None) -> tuple[GPT, TensorParallel | None]:
    """build_stage the simple way: the whole serial stage in fp32 on `device`, then parallelize()
    slices it (the reference the tests compare build_stage with; peaks at the serial stage)."""
    model = GPT(cfg, seed=seed, layers=layers, embed=embed, head=head).to(device)
    tp = None
    if group is not None and comm.size(group) > 1:
        tp = parallelize(model, group, sequence_parallel=sequence_parallel,
                         make_vocab_divisible_by=make_vocab_divisible_by, tracker=tracker)
    return model, tp
