"""Context parallelism (parallel.cp): every layer's sequence split over a cp group.

Load-balanced causal layout: a sequence of T tokens is cut into 2 cp chunks and cp rank r holds
chunks r and 2 cp - 1 - r. Under the causal mask an early chunk sees few keys and a late one
many, so pairing them gives every rank the same attention work. Everything but attention works
token by token, so the model runs unchanged on its T / cp tokens (RoPE and learned positions read
each token's global position from the micro-batch). Attention needs the keys and values of every
earlier token, from every rank:

  allgather  all-gather K and V over the group (cheap with GQA: K heads, not H), then one
             attention over all T keys under the mask; backward reduce-scatters dK and dV.
             What Llama 3 used for its 128K stage.
  ring       K and V travel around the ring, one rank's block per step while the next block is
             already in flight; the partial outputs are merged by their log-sum-exp. The backward
             runs the same ring, passing the dK, dV accumulators along. Holds two blocks of keys,
             never all T.

The mask (key index <= query index, and the same document under data.document_mask) is built
from the global token indices (ContextShard, boolean) and turned into an additive float mask, so the
model's attention takes it as it takes the serial document mask; its columns are the keys in gathered
order: rank 0's tokens, then rank 1's, and so on. With documents each micro-batch has its own, made
into one additive mask per forward; without, the mask depends on T alone, and ContextSharder builds
one shard per rank, its additive mask once, for every micro-batch and forward.
Attention-probability dropout is not supported under cp (Layout refuses it): the ring would need
the serial run's masks block by block.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..distributed import comm
from ..model.gpt import Attend, additive_mask, split_batch
from ..model.moe import MoE
from .mappings import _conjugate

SEQ = 2  # the sequence dim of q, k, v (B, heads, T, D)


def local_index(T: int, cp: int, rank: int) -> torch.Tensor:
    """Global indices of cp rank `rank`'s tokens: chunks rank and 2 cp - 1 - rank. (T / cp,)"""
    c = T // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


def gathered_index(T: int, cp: int) -> torch.Tensor:
    """Global index of each key in gathered (rank-major) order. (T,)"""
    return torch.cat([local_index(T, cp, r) for r in range(cp)])


class ContextShard(NamedTuple):
    """One cp rank's view of a micro-batch (in place of model.gpt.Documents).

    positions (B|1, T/cp): each local token's position (global, or within its document).
    mask (B|1, 1, T/cp, T) bool: which keys (gathered order) each local query may see.
    additive: None (attention() builds the additive mask per call, per forward), or a dict that
    keeps it per dtype, for a shard every micro-batch shares (ContextSharder).
    The loss of the shard is the mean over its own targets; the backend weighs it by its share of
    the counted targets (train/backends.loss_weights), and the data-parallel mean runs over dp x cp,
    so the step's loss is the whole sequence's mean, as in the serial run."""
    positions: torch.Tensor
    mask: torch.Tensor
    additive: dict | None = None

    def attention(self, dtype: torch.dtype) -> Attend:
        if self.additive is None:
            return Attend(additive_mask(self.mask, dtype), self.positions)
        if dtype not in self.additive:
            self.additive[dtype] = additive_mask(self.mask, dtype)  # (1, 1, T/cp, T)
        return Attend(self.additive[dtype], self.positions)

    def to(self, device) -> ContextShard:
        # a moved shard starts its own cache (the kept masks live on the old device)
        return ContextShard(self.positions.to(device), self.mask.to(device),
                            None if self.additive is None else {})


def shard_batch(batch, cp: int, rank: int) -> tuple:
    """(ids, labels[, Documents]) of whole sequences -> this cp rank's (ids, labels, ContextShard)."""
    ids, labels, docs = split_batch(batch)
    T = ids.shape[1]
    mine, keys = local_index(T, cp, rank), gathered_index(T, cp)  # (T/cp,), (T,)
    causal = keys[None, :] <= mine[:, None]  # (T/cp, T)
    if docs is None:
        mask = causal[None, None]  # (1, 1, T/cp, T)
        positions = mine[None]  # (1, T/cp)
    else:
        seg = docs.segments  # (B, T)
        mask = ((seg[:, mine, None] == seg[:, None, keys]) & causal)[:, None]  # (B, 1, T/cp, T)
        positions = mine[None] if docs.positions is None else docs.positions[:, mine]  # (B|1, T/cp)
    return ids[:, mine], labels[:, mine], ContextShard(positions, mask)


class ContextSharder:
    """shard_batch for one cp rank, onto its device. Without packed documents every micro-batch's
    shard is the same (positions and the causal mask depend on T alone), so it is built once and
    shared, its additive mask too: one (1, 1, T/cp, T) mask on the rank for the whole run, where each
    micro-batch in flight would hold its own (2 GiB in bf16 at Llama 3's 128K over CP16, times the
    pipeline's chunk-micro-batches in flight). With documents each micro-batch keeps its own."""

    def __init__(self, cp: int, rank: int, device: torch.device):
        self.cp, self.rank, self.device = cp, rank, device
        self._plain: dict[int, ContextShard] = {}  # T -> the document-free shard, on device

    def __call__(self, batch) -> tuple:
        ids, labels, docs = split_batch(batch)
        if docs is not None:
            return tuple(t.to(self.device) for t in shard_batch(batch, self.cp, self.rank))
        T = ids.shape[1]
        if T not in self._plain:
            _, _, shard = shard_batch((ids, labels), self.cp, self.rank)
            self._plain[T] = ContextShard(shard.positions.to(self.device), shard.mask.to(self.device), {})
        mine = local_index(T, self.cp, self.rank)  # (T/cp,)
        return ids[:, mine].to(self.device), labels[:, mine].to(self.device), self._plain[T]


# ---- allgather -----------------------------------------------------------------------------------
def _gather_seq(x, group):
    return comm.all_gather(x, group, dim=SEQ)


def _reduce_scatter_seq(x, group):
    return comm.reduce_scatter(x, group, dim=SEQ)


# forward: every rank's keys/values; backward: each rank's dK/dV summed over the queries of all ranks
gather_kv = _conjugate("GatherKV", _gather_seq, _reduce_scatter_seq)


def allgather_attention(q, k, v, mask, group) -> torch.Tensor:
    """q (B, H, T/cp, D), k, v (B, K, T/cp, D), mask (B|1, 1, T/cp, T) additive -> (B, H, T/cp, D)."""
    k, v = gather_kv(k, group), gather_kv(v, group)  # (B, K, T, D) each, gathered order
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


# ---- ring ----------------------------------------------------------------------------------------
def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K * groups, S, D): each kv head for its group of query heads."""
    return t.repeat_interleave(groups, dim=1) if groups > 1 else t


def _fold(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, K * groups, S, D) gradients -> (B, K, S, D): summed over each kv head's query heads."""
    B, H, S, D = t.shape
    return t.view(B, H // groups, groups, S, D).sum(2) if groups > 1 else t


def _wide(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def _probs(q, k, mask, lse, scale):
    """exp(q k^T scale + mask - lse), at least fp32: (B, H, Tq, Tk); mask additive (0 or -inf).
    lse (B, H, Tq) may be -inf on rows the mask empties; those rows give 0 (not NaN)."""
    w = _wide(q)
    s = torch.matmul(q.to(w), k.to(w).transpose(-1, -2)) * scale + mask.to(w)  # (B, H, Tq, Tk)
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - safe[..., None]), lse


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over every rank's keys, the keys passed around the
    ring of `ranks` (global ranks in cp order; this rank is ranks[me]). Step s attends to the block
    of rank me - s, while the block of rank me - s - 1 arrives."""

    @staticmethod
    def forward(ctx, q, k, v, mask, group, ranks, me):
        cp, groups = len(ranks), q.shape[1] // k.shape[1]
        nxt, prv = ranks[(me + 1) % cp], ranks[(me - 1) % cp]
        Tl, scale = q.shape[SEQ], 1.0 / math.sqrt(q.shape[-1])
        out = torch.zeros(q.shape, dtype=_wide(q), device=q.device)  # (B, H, T/cp, D), accumulated wide
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=out.dtype, device=q.device)  # (B, H, T/cp)
        kv = torch.stack([k, v])  # (2, B, K, T/cp, D): one message per step
        for s in range(cp):
            src = (me - s) % cp
            if s < cp - 1:  # the next block travels while this one is computed
                nxt_kv = torch.empty_like(kv)
                recv = comm.irecv(nxt_kv, prv, group, tag=0)
                send = comm.isend(kv, nxt, group, tag=0)
            m = mask[..., src * Tl:(src + 1) * Tl]  # (B|1, 1, T/cp, T/cp)
            if bool((m == 0).any()):  # a block the mask hides entirely is skipped
                p, blk_lse = _probs(q, _expand(kv[0], groups), m, None, scale)  # (B, H, T/cp, T/cp)
                blk = torch.matmul(p, _expand(kv[1], groups).to(p.dtype))  # (B, H, T/cp, D)
                new = torch.logaddexp(lse, blk_lse)  # (B, H, T/cp)
                keep = torch.where(torch.isinf(lse), torch.zeros_like(lse), torch.exp(lse - new))
                take = torch.where(torch.isinf(blk_lse), torch.zeros_like(lse), torch.exp(blk_lse - new))
                out = out * keep[..., None] + blk * take[..., None]
                lse = new
            if s < cp - 1:
                recv.wait()
                send.wait()
                kv = nxt_kv
        # (B, H, T/cp, D) over (B, T/cp, H, D) memory, as SDPA returns it: the model's transpose to
        # (B, T/cp, H D) for the output projection is then a view, so one copy is kept, not two
        out = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.group, ctx.ranks, ctx.me = group, ranks, me
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask, out, lse = ctx.saved_tensors
        group, ranks, me = ctx.group, ctx.ranks, ctx.me
        cp, groups = len(ranks), q.shape[1] // k.shape[1]
        nxt, prv = ranks[(me + 1) % cp], ranks[(me - 1) % cp]
        Tl, scale = q.shape[SEQ], 1.0 / math.sqrt(q.shape[-1])
        wide = lse.dtype
        do = dout.to(wide)  # (B, H, T/cp, D)
        delta = (do * out.to(wide)).sum(-1)  # (B, H, T/cp): rowsum(dO * O)
        dq = torch.zeros(q.shape, dtype=wide, device=q.device)
        kv = torch.stack([k, v])  # (2, B, K, T/cp, D)
        acc = None  # dK, dV of the block being visited: (2, B, K, T/cp, D), summed rank by rank
        sent = []
        for s in range(cp):
            src = (me - s) % cp
            if s < cp - 1:
                nxt_kv = torch.empty_like(kv)
                recv_kv = comm.irecv(nxt_kv, prv, group, tag=1)
                sent.append(comm.isend(kv, nxt, group, tag=1))
            if s > 0:  # src's accumulator, from the rank that visited src one step ago
                acc_in = torch.empty((2,) + k.shape, dtype=wide, device=q.device)
                recv_acc = comm.irecv(acc_in, prv, group, tag=2)
            m = mask[..., src * Tl:(src + 1) * Tl]  # (B|1, 1, T/cp, T/cp)
            blk = torch.zeros((2,) + k.shape, dtype=wide, device=q.device)  # this rank's dK, dV of src
            if bool((m == 0).any()):  # a block the mask hides entirely is skipped
                kk, vv = _expand(kv[0], groups).to(wide), _expand(kv[1], groups).to(wide)
                p, _ = _probs(q, kk, m, lse, scale)  # (B, H, T/cp, T/cp)
                blk[1] = _fold(torch.matmul(p.transpose(-1, -2), do), groups)  # dV
                ds = p * (torch.matmul(do, vv.transpose(-1, -2)) - delta[..., None])  # (B, H, T/cp, T/cp)
                dq += torch.matmul(ds, kk) * scale
                blk[0] = _fold(torch.matmul(ds.transpose(-1, -2), q.to(wide)) * scale, groups)  # dK
            if s > 0:
                recv_acc.wait()
                blk += acc_in
            acc = blk
            if s < cp - 1:
                sent.append(comm.isend(acc, nxt, group, tag=2))
                recv_kv.wait()
                kv = nxt_kv
        # acc is complete for block me + 1 (every rank has added to it): home it, and take ours.
        mine = acc
        if cp > 1:
            mine = torch.empty_like(acc)
            recv = comm.irecv(mine, prv, group, tag=3)
            sent.append(comm.isend(acc, nxt, group, tag=3))
            recv.wait()
        for t in sent:
            t.wait()
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None, None, None


def ring_attention(q, k, v, mask, group, ranks: list[int], me: int) -> torch.Tensor:
    """q (B, H, T/cp, D), k, v (B, K, T/cp, D), mask (B|1, 1, T/cp, T) additive -> (B, H, T/cp, D)."""
    # k, v stay views into the fused qkv output (kept anyway): their blocks are stacked to be sent
    return RingAttention.apply(q, k, v, mask, group, ranks, me)


ALGORITHMS = ("allgather", "ring")


@contextlib.contextmanager
def whole_sequence_attention(model):
    """Inside: every block's attention is the serial one again, for work that sees whole sequences
    on each rank (KV-cached decoding: every cp rank holds the full weights)."""
    swapped = {name: block.attn.__dict__.pop("core") for name, block in model.blocks.items()
               if "core" in block.attn.__dict__}
    try:
        yield model
    finally:
        for name, core in swapped.items():
            model.blocks[name].attn.core = core


def apply_context_parallel(model, group, ranks: list[int], me: int, algorithm: str) -> None:
    """Swap every block's attention core for its context-parallel form over `group` (global
    `ranks` in cp order, this rank ranks[me]). The model code stays as it is: its attention hands
    the core q, k, v of the local tokens and the mask from the micro-batch's ContextShard."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"context-parallel algorithm {algorithm!r}; one of {ALGORITHMS}")
    for m in model.modules():  # MoE's balancing loss counts the assignments of the whole sequences
        if isinstance(m, MoE):
            m.add_token_shards(len(ranks), lambda t: comm.all_reduce(t, group))
    for block in model.blocks.values():
        if algorithm == "allgather":
            block.attn.core = lambda q, k, v, mask, causal: allgather_attention(q, k, v, mask, group)
        else:
            block.attn.core = lambda q, k, v, mask, causal: ring_attention(q, k, v, mask, group, ranks, me)
