"""Memory-mapped token store and the deterministic, resumable sampler.

The sampler's state is a single integer: the cursor, counted in *global* samples consumed. Sample
i of the run is window perm_e[i mod n] of epoch e = i // n, where perm_e is a permutation seeded
by (seed, e). So the same seed and cursor always give the same sequences, a checkpoint only saves
the cursor, and data-parallel ranks can later each take their slice of samples [c, c + batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .documents import Packing
from .tokenizer import DataError


class TokenStore:
    """A prepared data directory: meta.json plus one memory-mapped token array per split."""

    def __init__(self, directory: str | Path, what: str = "data.dir"):
        self.dir = Path(directory)
        self.what = what  # how errors name this directory (a blend names its source)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{what} {str(self.dir)!r} holds no prepared data (no meta.json); run "
                            f"`megatron-lite prepare-data --out {self.dir}` first or fix {what}.")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.vocab_size = int(self.meta["vocab_size"])
            self.eot_id = int(self.meta["eot_id"])
            dtype = np.dtype(self.meta["dtype"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{str(meta_path)!r} is corrupt ({e!r}); prepare the data again with "
                            f"`megatron-lite prepare-data --force`.") from None
        self.splits: dict[str, np.ndarray] = {}
        for split, info in self.meta.get("splits", {}).items():
            path = self.dir / f"{split}.bin"
            try:
                expected = int(info["tokens"]) * dtype.itemsize
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{str(meta_path)!r} is corrupt (split {split!r} has no token count); "
                                "prepare the data again with `megatron-lite prepare-data --force`.") from None
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{str(path)!r} is missing or truncated (expected {expected} bytes); "
                                f"prepare the data again with `megatron-lite prepare-data --force`.")
            self.splits[split] = np.memmap(path, dtype=dtype, mode="r")

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise DataError(f"{self.what} {str(self.dir)!r} has no {name!r} split; prepare it again.")
        return self.splits[name]

    def documents(self, name: str) -> np.ndarray:
        return np.load(self.dir / f"{name}.idx.npy")


class Sampler:
    """Fixed-length (seq_len + 1)-token windows from a token array, shuffled per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True,
                 packing: Packing | None = None):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.packing = packing  # documents and separator targets (data/documents.py); None: neither
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"a split of {len(tokens)} tokens is too short for one sequence of "
                            f"{seq_len + 1} tokens; lower data.seq_length or prepare more data.")
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def window(self, sample: int) -> int:
        """Window index of global sample number `sample`."""
        epoch, j = divmod(sample, self.num_windows)
        if not self.shuffle:
            return j
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_windows, generator=g), epoch
        return int(self._perm[j])

    def batch(self, cursor: int, size: int) -> tuple:
        """Samples [cursor, cursor + size) as (inputs, labels), each (size, seq_len) int64, and
        their model.gpt.Documents third when the sampler's packing masks documents."""
        L = self.seq_len
        offsets = [self.window(cursor + i) * L for i in range(size)]
        rows = [np.asarray(self.tokens[o: o + L + 1], dtype=np.int64) for o in offsets]
        xy = torch.from_numpy(np.stack(rows))  # (size, L + 1)
        if self.packing is None:
            return xy[:, :-1], xy[:, 1:]
        return self.packing.apply(offsets, xy[:, :-1], xy[:, 1:])


def rank_micro_batch_starts(cursor: int, micro_batch: int, microbatches: int, dp: int,
                            dp_rank: int) -> list[int]:
    """First global sample of each micro-batch data-parallel rank `dp_rank` takes from the global
    batch [cursor, cursor + micro_batch * microbatches * dp): micro-batch j is slice j * dp + rank,
    so the ranks together take every sample exactly once, in serial accumulation's order."""
    return [cursor + (j * dp + dp_rank) * micro_batch for j in range(microbatches)]
