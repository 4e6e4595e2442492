"""Packed documents: which document each token of a training window belongs to.

prepare-data writes every split as documents back to back, each followed by the separator, and
the start offset of every document ({split}.idx.npy). A window of seq_len + 1 tokens usually
spans several documents. With data.document_mask the model's attention stays inside each
document (model.gpt.Documents); data.reset_position_ids restarts positions at each document's
first token; data.mask_separator_loss drops the targets that follow a separator (the first token
of the next, unrelated document), as Megatron's eod_mask_loss does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.gpt import Documents


@dataclass(frozen=True)
class Packing:
    """What a split's training windows carry besides their tokens (data.document_mask,
    data.reset_position_ids, data.mask_separator_loss): `starts` (the split's document starts, or
    None without document masking) and `separator` (the id whose following target is ignored, or
    None)."""
    starts: np.ndarray | None
    reset_positions: bool = False
    separator: int | None = None

    def apply(self, offsets: list[int], x: torch.Tensor, y: torch.Tensor) -> tuple:
        """(x, y) of windows starting at token `offsets` -> (x, y) or (x, y, Documents)."""
        if self.separator is not None:
            y = mask_separator_targets(x, y, self.separator)
        if self.starts is None:
            return x, y
        return x, y, window_documents(self.starts, offsets, x.shape[1], self.reset_positions)


def window_documents(starts: np.ndarray, offsets: list[int], seq_len: int,
                     reset_positions: bool) -> Documents:
    """Documents of the input tokens of windows starting at token `offsets` (one per row).

    starts: sorted start offsets of the split's documents (starts[0] == 0). Row b's input token t
    is token offsets[b] + t of the split; its segment is the number of documents that start in
    (offsets[b], offsets[b] + t], so a document begun before the window is segment 0."""
    tok = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(seq_len)  # (B, T) split offsets
    doc = np.searchsorted(starts, tok, side="right") - 1  # (B, T) index of each token's document
    segments = doc - doc[:, :1]  # (B, T) 0 for the document the window starts in
    positions = None
    if reset_positions:
        # A document's first token in this window: its start, or the window's first token.
        first = np.maximum(starts[doc], tok[:, :1])  # (B, T)
        positions = torch.from_numpy(tok - first)  # (B, T) 0 at each document's first token
    return Documents(torch.from_numpy(segments), positions)


def mask_separator_targets(ids: torch.Tensor, labels: torch.Tensor, separator: int) -> torch.Tensor:
    """labels with -100 (ignored) where the input token is the separator: what follows it is the
    next document's first token, which nothing in this document predicts."""
    return labels.masked_fill(ids == separator, -100)  # (B, T)
