"""Split the transformer blocks into pipeline pieces.

With pp stages and v chunks per stage (interleaving), the blocks are cut into pp * v contiguous
pieces; piece k (a "virtual stage") lives on stage k % pp as its chunk k // pp. The embedding is
on virtual stage 0, the final norm + LM head on the last one. Methods:
    even       as equal as possible (the first pieces take the remainder)
    params     balance parameter counts, counting the embedding on the first piece and the LM head
               on the last (a greedy cut of the prefix sums)
    explicit   parallel.pp_layers: the number of blocks of each piece
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import LayoutError


@dataclass(frozen=True)
class Chunk:
    virtual_stage: int
    layers: tuple[int, ...]
    first: bool  # holds the embedding
    last: bool  # holds the final norm and LM head


def split_layers(cfg: ModelConfig, pieces: int, method: str = "even", sizes: list[int] | None = None
                 ) -> list[tuple[int, ...]]:
    L = cfg.num_layers
    if pieces > L:
        raise LayoutError(f"parallel.pp x virtual stages = {pieces} pipeline pieces exceed "
                          f"model.num_layers={L}; every piece needs at least one block, so lower "
                          f"parallel.pp or add layers.")
    if sizes:
        if len(sizes) != pieces or sum(sizes) != L or min(sizes) < 1:
            raise LayoutError(f"parallel.pp_layers={sizes} must list {pieces} positive block counts "
                              f"summing to model.num_layers={L}.")
        counts = list(sizes)
    elif method == "even":
        base, extra = divmod(L, pieces)
        counts = [base + (1 if k < extra else 0) for k in range(pieces)]
    elif method == "params":
        counts = _balance_by_params(cfg, pieces)
    else:
        raise LayoutError(f"parallel.partition={method!r} is unknown; choose even or params.")
    out, start = [], 0
    for c in counts:
        out.append(tuple(range(start, start + c)))
        start += c
    return out


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
    """The chunks (in chunk order) that pipeline stage `stage` holds."""
    if pp * v > cfg.num_layers:
        raise LayoutError(f"parallel.pp={pp} x parallel.virtual_stages={v} = {pp * v} pipeline pieces exceed "
                          f"model.num_layers={cfg.num_layers}; every piece needs a block, "
                          f"so lower parallel.pp.")
    if v > 1 and cfg.num_layers % (pp * v):
        raise LayoutError(f"interleaving with parallel.virtual_stages={v} needs "
                          f"model.num_layers={cfg.num_layers} "
                          f"divisible by parallel.pp x virtual_stages = {pp * v}.")
    pieces = split_layers(cfg, pp * v, method, sizes)
    last = pp * v - 1
    return [Chunk(c * pp + stage, pieces[c * pp + stage], c * pp + stage == 0, c * pp + stage == last)
            for c in range(v)]
