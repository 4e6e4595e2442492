"""How tensor parallelism slices every parameter, as pure tensor arithmetic (no nn, no comm).

One table, keyed by global (serial) parameter names, is read by everything that needs to know
where a rank's shard sits in the full tensor: parallelize (slicing the serial weights), the
checkpoint store (writing and reading slices of the one global checkpoint, so checkpoint export and
generate see serial tensors), verify and the parity tests (slicing serial gradients), and plan
(per-rank parameter sizes on a meta-device model).

    tok_emb.weight, lm_head.weight   rows = the vocabulary, padded first (Megatron's padding)
    attn.qkv.{weight,bias}           rows = [q | k | v]: each rank takes its heads of each block
    mlp.fc1.{weight,bias}            rows (SwiGLU: [gate | up], each block split separately)
    attn.proj.weight, mlp.fc2.weight columns (row-parallel layers split their input)
    mlp.experts.fc1, mlp.experts.fc2 experts (dim 0) over the expert-parallel group, not over tp
    everything else                  replicated (norms, pos_emb, row-parallel biases, routers)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """How tensor parallelism divides one parameter: along `dim`, each fused block (sizes in the
    full tensor, e.g. q | k | v) split separately so every rank keeps a slice of each; `vocab` rows
    are first padded to the padded vocabulary (and trimmed again when consolidating)."""
    dim: int = 0
    blocks: tuple[int, ...] = ()  # () = one block, the whole dimension
    vocab: bool = False
    labels: tuple[str, ...] = ()  # names of the blocks (checkpoints store each block on its own)
    axis: str = "tp"  # the group that splits it: tensor- ("tp") or expert-parallel ("ep")


def padded_vocab(vocab_size: int, tp: int, divisible_by: int) -> int:
    """The vocabulary the embedding and head hold, summed over tp ranks: the smallest multiple of
    tp x divisible_by holding it (Megatron's padding, so every rank's slice is equal and GEMM-friendly)
    when tp > 1; the serial model (tp = 1) is never padded."""
    if tp == 1:
        return vocab_size
    m = tp * divisible_by
    return -(-vocab_size // m) * m


def slicing_table(cfg) -> list[tuple[tuple[str, ...], Split]]:
    """The one slicing table: (suffixes of) global parameter names -> their Split. Parameters it
    does not name are replicated."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    width = cfg.intermediate_size
    return [
        (("tok_emb.weight", "lm_head.weight"), Split(0, vocab=True)),  # VocabParallelEmbedding / head
        (("attn.qkv.weight", "attn.qkv.bias"), Split(0, (q, kv, kv), labels=("q", "k", "v"))),  # fused
        (("mlp.fc1.weight", "mlp.fc1.bias"),
         Split(0, (width, width), labels=("gate", "up")) if cfg.activation == "swiglu" else Split(0)),
        (("attn.proj.weight", "mlp.fc2.weight"), Split(1)),  # row-parallel: input columns
        (("experts.fc1", "experts.fc2"), Split(0, axis="ep")),  # MoE: (E, out, in), experts split
    ]


def split_of(name: str, cfg) -> Split | None:
    """The table's entry for global parameter `name`; None if it is replicated."""
    for suffixes, split in slicing_table(cfg):
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return split
    return None


def shard_tensor(t: torch.Tensor, split: Split, rank: int, tp: int, padded: int) -> torch.Tensor:
    """Rank `rank`'s slice of the full tensor t (works on meta tensors too)."""
    if split.vocab and padded > t.shape[0]:
        t = torch.cat([t, t.new_zeros((padded - t.shape[0],) + t.shape[1:])])  # padded rows: never used
    blocks = t.split(list(split.blocks), split.dim) if split.blocks else (t,)
    return torch.cat([b.chunk(tp, split.dim)[rank] for b in blocks], split.dim).contiguous()


class TPSharder:
    """Slices full (serial) tensors into one rank's shard, by global parameter name: its tp rank's
    of the tensor-parallel ones, its ep rank's of the experts."""

    def __init__(self, model_cfg, tp: int, rank: int, make_vocab_divisible_by: int = 128, ep: int = 1,
                 ep_rank: int = 0):
        self.cfg = model_cfg
        self.tp, self.rank = tp, rank
        self.ep, self.ep_rank = ep, ep_rank
        self.vocab = model_cfg.vocab_size
        self.padded_vocab = padded_vocab(self.vocab, tp, make_vocab_divisible_by)
        self.vocab_start = rank * self.padded_vocab // tp

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The shard of global parameter `name` (replicated parameters come back whole)."""
        split = split_of(name, self.cfg)
        if split is None:
            return t
        rank, size = (self.ep_rank, self.ep) if split.axis == "ep" else (self.rank, self.tp)
        return shard_tensor(t, split, rank, size, self.padded_vocab)
