"""Split the transformer blocks into pipeline pieces.

With pp stages and v chunks per stage (interleaving), the blocks are cut into pp * v contiguous
pieces; piece k (a "virtual stage") lives on stage k % pp as its chunk k // pp. The embedding is
on piece 0, the final norm + LM head on the last piece. Pieces may differ in size, with or
without interleaving (the schedules and the engine only see chunks; every message between pieces
has the same (micro-batch, sequence, hidden) shape). Methods:

    even       as equal as possible in blocks (the first pieces take the remainder); needs
               pp * v <= model.num_layers
    params     balance parameter counts, counting the embedding on the first piece and the LM head
               on the last (a greedy cut of the prefix sums); needs pp * v <= model.num_layers
    balanced   the embedding and the final norm + LM head each count as one block of load
               (Megatron-LM's account_for_embedding_in_pipeline_split and
               account_for_loss_in_pipeline_split): num_layers + 2 units are split as equally as
               possible into pp * v pieces, the remainder one unit each to the pieces after the
               first (the first piece already holds the embedding and, under 1F1B, the most
               micro-batches in flight); piece 0 then holds the embedding and one unit fewer of
               blocks, the last piece the head and one unit fewer. So a piece of one unit at either
               end holds the embedding alone or the head alone: Llama 3 405B's 126 layers on pp=16
               with v=8 are 128 pieces of one unit ([0, 1 x 126, 0] blocks), with v=4
               [1, 2 x 62, 1], with v=2 [3, 4 x 30, 3]. Needs pp * v <= num_layers + 2.
    explicit   parallel.pp_layers: the blocks of each of the pp * v pieces, in piece (virtual
               stage) order; overrides parallel.partition.

A piece with no blocks is allowed only at the ends, where it still holds the embedding (the first
piece) or the final norm + LM head (the last): a piece with nothing at all would only forward its
input, so it is refused. pp * v = 1 holds everything whatever the method.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import LayoutError


@dataclass(frozen=True)
class Chunk:
    virtual_stage: int
    layers: tuple[int, ...]  # global block indices, ascending; empty for an embedding- or head-only piece
    first: bool  # holds the embedding
    last: bool  # holds the final norm and LM head


def split_layers(cfg: ModelConfig, pp: int, v: int = 1, method: str = "even", sizes: list[int] | None = None
                 ) -> list[tuple[int, ...]]:
    """The global block indices of each of the pp * v pieces, in piece (virtual stage) order."""
    out, start = [], 0
    for c in piece_sizes(cfg, pp, v, method, sizes):
        out.append(tuple(range(start, start + c)))
        start += c
    return out


def piece_sizes(cfg: ModelConfig, pp: int, v: int = 1, method: str = "even", sizes: list[int] | None = None
                ) -> list[int]:
    """How many blocks each of the pp * v pieces holds (every rule checked, one sentence each)."""
    L, pieces = cfg.num_layers, pp * v
    what = f"parallel.pp={pp} x parallel.virtual_stages={v} = {pieces} pipeline pieces"
    if sizes:
        counts = list(sizes)
        if len(counts) != pieces or sum(counts) != L or min(counts) < 0:
            raise LayoutError(f"parallel.pp_layers={counts} must list {pieces} block counts, one per "
                              f"pipeline piece (parallel.pp={pp} x parallel.virtual_stages={v}, in "
                              f"virtual-stage order), each >= 0, summing to model.num_layers={L}.")
        # Only the end pieces hold something besides blocks (the embedding, the head).
        for k, c in enumerate(counts):
            if c == 0 and 0 < k < pieces - 1:
                raise LayoutError(f"parallel.pp_layers={counts} leaves piece {k} with no blocks, but only "
                                  f"the first piece (it holds the embedding) or the last (the final norm and "
                                  f"LM head) may hold no blocks; move a block into piece {k}.")
        return counts
    if method == "balanced":
        if pieces > L + 2:
            raise LayoutError(f"{what} exceed model.num_layers + 2 = {L + 2} (parallel.partition=balanced "
                              f"counts the embedding and the head as one block each and leaves no piece "
                              f"empty), so lower parallel.pp or parallel.virtual_stages.")
        return _balance_with_ends(L, pieces)
    if method not in ("even", "params"):
        raise LayoutError(f"parallel.partition={method!r} is unknown; choose even, params or balanced.")
    if pieces > L:
        raise LayoutError(f"{what} exceed model.num_layers={L}; with parallel.partition={method} every "
                          f"piece needs a block, so lower parallel.pp or parallel.virtual_stages (or use "
                          f"parallel.partition=balanced, whose end pieces may hold only the embedding "
                          f"or the head).")
    if method == "params":
        return _balance_by_params(cfg, pieces)
    base, extra = divmod(L, pieces)
    return [base + (1 if k < extra else 0) for k in range(pieces)]


def equal_load(cfg: ModelConfig, pieces: int, method: str = "even", sizes: list[int] | None = None) -> bool:
    """Whether `method` cuts `pieces` pieces of the same load (blocks, or units for balanced): the
    layouts the planner proposes for interleaving, where the slowest chunk sets every chunk's pace."""
    if sizes:
        return len(sizes) == pieces
    if method == "balanced":
        return (cfg.num_layers + 2) % pieces == 0
    return cfg.num_layers % pieces == 0


def _balance_with_ends(L: int, pieces: int) -> list[int]:
    """partition=balanced: L + 2 units (blocks, the embedding, the head) split as equally as
    possible, less the embedding's unit on the first piece and the head's on the last."""
    if pieces == 1:
        return [L]
    base, extra = divmod(L + 2, pieces)  # base >= 1 since pieces <= L + 2
    units = [base + (1 if 1 <= k <= extra else 0) for k in range(pieces)]
    units[0] -= 1  # the embedding
    units[-1] -= 1  # the final norm + LM head
    return units


def _balance_by_params(cfg: ModelConfig, pieces: int) -> list[int]:
    h, ffn, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    block = 4 * h * h + (3 if cfg.activation == "swiglu" else 2) * h * ffn  # dominant terms
    emb = V * h
    L = cfg.num_layers
    weights = [block] * L
    weights[0] += emb
    weights[-1] += emb  # LM head (a copy when tied)
    target = sum(weights) / pieces
    counts, acc, n = [], 0.0, 0
    for i, w in enumerate(weights):
        remaining_layers, remaining_pieces = L - i, pieces - len(counts)
        if n and (acc + w / 2 > target or remaining_layers < remaining_pieces) and len(counts) < pieces - 1:
            counts.append(n)
            acc, n = 0.0, 0
        acc += w
        n += 1
    counts.append(n)
    return counts


def stage_chunks(cfg: ModelConfig, pp: int, stage: int, v: int = 1, method: str = "even",
                 sizes: list[int] | None = None) -> list[Chunk]:
    """The chunks (in chunk order) that pipeline stage `stage` holds: pieces stage, stage + pp, ..."""
    pieces = split_layers(cfg, pp, v, method, sizes)
    last = pp * v - 1
    return [Chunk(c * pp + stage, pieces[c * pp + stage], c * pp + stage == 0, c * pp + stage == last)
            for c in range(v)]
