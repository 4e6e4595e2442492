"""Blended datasets: several prepared corpora, each training sample drawn from one of them by weight.

Which source global sample i comes from is a pure function of i (and the weights), so the sampler's
whole state stays the one global cursor, as for a single corpus: data-parallel ranks each compute
their own slice, and a resume from the cursor is exact. The schedule is Megatron's blending index,
computed in closed form instead of stored: every source k emits samples at evenly spaced times
(2j + 1) / (2 w_k), j = 0, 1, ..., and the global sample order is the order of those times (ties go
to the lower source index). Sample i is therefore always given to the source whose share lags its
weight most, any prefix of n samples holds about n w_k / W of source k (exactly that when n is a
multiple of the weights' common period, e.g. 6000/3000/1000 of 10000 for 0.6/0.3/0.1), and the
samples a source contributes are its own samples 0, 1, 2, ... in order: its per-source cursor. Each
source's Sampler shuffles its own windows, so the seed decides the sample order through them.

The arithmetic is exact: the weights are read as the decimals written (0.1 is 1/10, not the nearest
binary fraction) and scaled to integers, and every comparison is between Python integers.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import torch

from ..model.gpt import Documents
from .dataset import Sampler, TokenStore
from .documents import Packing
from .tokenizer import DataError, tokenizer_identity


class BlendSchedule:
    """Which source each global sample comes from, and each source's cursor at any global cursor."""

    def __init__(self, weights: list[float]):
        exact = [Fraction(repr(float(w))) for w in weights]  # the decimal the user wrote
        scale = math.lcm(*(f.denominator for f in exact))
        self.weights = [int(f * scale) for f in exact]  # same ratios, as integers
        self.total = sum(self.weights)
        if any(w < 0 for w in self.weights) or self.total <= 0:
            raise ValueError(f"blend weights {weights} must be >= 0 with a positive sum")
        self.active = [k for k, w in enumerate(self.weights) if w > 0]

    def _time(self, k: int, j: int) -> tuple[Fraction, int]:
        """When source k emits its sample j (ties broken by the source index)."""
        return Fraction(2 * j + 1, 2 * self.weights[k]), k

    def cursors(self, cursor: int) -> list[int]:
        """Samples each source has given to global samples [0, cursor)."""
        # Every source's samples emitted strictly before time cursor / W: a prefix of the global
        # order, within len(weights) / 2 samples of `cursor` long ...
        W, n = self.total, cursor
        counts = [max(0, -((W - 2 * n * w) // (2 * W))) for w in self.weights]  # ceil((2nw - W) / 2W)
        # ... then extended or shortened one sample at a time to exactly `cursor` samples.
        while sum(counts) < n:
            k = min(self.active, key=lambda k: self._time(k, counts[k]))
            counts[k] += 1
        while sum(counts) > n:
            k = max((k for k in self.active if counts[k] > 0), key=lambda k: self._time(k, counts[k] - 1))
            counts[k] -= 1
        return counts

    def assign(self, cursor: int, size: int) -> list[tuple[int, int]]:
        """(source, that source's sample number) of global samples [cursor, cursor + size)."""
        counts = self.cursors(cursor)
        out = []
        for _ in range(size):
            k = min(self.active, key=lambda k: self._time(k, counts[k]))
            out.append((k, counts[k]))
            counts[k] += 1
        return out


class BlendedSampler:
    """Several Samplers behind the one Sampler interface: batch(cursor, size) of global samples.
    Each source's Sampler keeps its own shuffle and epochs; its cursor is derived, never stored."""

    def __init__(self, samplers: list[Sampler], weights: list[float], names: list[str]):
        self.samplers = samplers
        self.names = names
        self.schedule = BlendSchedule(weights)
        self.seq_len = samplers[0].seq_len

    def cursors(self, cursor: int) -> dict[str, int]:
        """Per source: its samples consumed by global samples [0, cursor)."""
        return dict(zip(self.names, self.schedule.cursors(cursor), strict=True))

    def batch(self, cursor: int, size: int) -> tuple:
        """Global samples [cursor, cursor + size) as (inputs, labels), each (size, seq_len) int64,
        and their Documents third when the sources' samplers mask documents."""
        picks = self.schedule.assign(cursor, size)
        parts: list = []  # per output tensor: (size, L), filled source by source
        for k, sampler in enumerate(self.samplers):
            rows = [i for i, (source, _) in enumerate(picks) if source == k]
            if rows:
                # A source's samples in one batch are consecutive samples of its own: one call.
                got = sampler.batch(picks[rows[0]][1], len(rows))  # (ids, labels[, Documents])
                flat = [*got[:2], *got[2]] if len(got) > 2 else list(got)  # tensors (len(rows), L)
                if not parts:
                    parts = [None if t is None else torch.empty((size,) + t.shape[1:], dtype=t.dtype)
                             for t in flat]
                for out, t in zip(parts, flat, strict=True):
                    if out is not None:
                        out[rows] = t
        if len(parts) == 2:
            return parts[0], parts[1]
        return parts[0], parts[1], Documents(*parts[2:])


def open_sources(dirs: list[str], names: list[str], what: str = "data.blend") -> list[TokenStore]:
    """Each source's token store, refused in one sentence when a directory is missing or the
    sources were not tokenized alike (their ids would mean different tokens)."""
    stores = []
    for i, (d, name) in enumerate(zip(dirs, names, strict=True)):
        if not Path(d).is_dir():
            raise DataError(f"{what}[{i}] ({name!r}) dir {d!r} does not exist; prepare it with "
                            f"`megatron-lite prepare-data --out {d}` or fix the path.")
        stores.append(TokenStore(d, what=f"{what}[{i}] ({name!r}) dir"))
    first = tokenizer_identity(dirs[0])
    for i, d in enumerate(dirs[1:], start=1):
        theirs = tokenizer_identity(d)
        if theirs != first:
            file = Path(dirs[0]) / "tokenizer.json"
            given = file if file.is_file() else "bytes"
            raise DataError(f"{what}[{i}] ({names[i]!r}) dir {d!r} was tokenized by {theirs}, but "
                            f"{what}[0] ({names[0]!r}) dir {dirs[0]!r} by {first}; prepare every source with "
                            f"one tokenizer, e.g. `megatron-lite prepare-data --tokenizer {given}`.")
    return stores


def source_sampler(store: TokenStore, split: str, seq_len: int, seed: int, name: str,
                   shuffle: bool, packing: Packing | None = None) -> Sampler:
    """A source's Sampler; a split too short for one sequence is named with its source."""
    try:
        return Sampler(store.split(split), seq_len, seed, shuffle=shuffle, packing=packing)
    except DataError as e:
        raise DataError(f"data.blend source {name!r} ({str(store.dir)!r}), {split} split: {e}") from None


def source_seed(seed: int, k: int) -> int:
    """Source k's shuffling seed: distinct per source (two corpora of equal size are not shuffled
    alike); source 0 keeps data.seed, so a blend of one source samples exactly as data.dir does."""
    return seed + k
