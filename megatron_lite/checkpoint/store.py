"""The layout-independent tensor store: every tensor once, under its serial-model name and its
global (unsharded, unpadded) shape, written as slices by the ranks that own them.

A rank's local tensor maps onto the stored tensors through the tensor-parallel slicing table
(parallel/tensor_parallel.py): a replicated parameter is one whole stored tensor; a column- or
row-parallel one is a contiguous slice; a fused one (qkv, SwiGLU's gate|up) is one slice of each
of its blocks, which are stored as separate tensors (`...qkv.weight:q`, `:k`, `:v`) so every shard
is a plain slice; the padded vocabulary is trimmed (padding rows are never stored and read back as
zeros). Reading is the same map backwards, for whatever layout the reader has: a rank reads the
regions it needs from whichever chunks overlap them.

Files are safetensors (no pickle; partial reads without loading a whole file), one per writing
rank (`rank_NNNNN.safetensors`); the index of every stored tensor — shape, dtype and the chunks
it was written in — goes into the manifest (JSON).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..slicing import Split, split_of
from .integrity import DTYPE_CODES, chunk_name

DTYPES = {name: getattr(torch, name) for name in DTYPE_CODES}  # the manifest's dtype names


@dataclass(frozen=True)
class Piece:
    """One region of a stored tensor that lives in (a slice of) a rank's local tensor."""
    key: str  # stored tensor name
    shape: tuple[int, ...]  # the stored tensor's global shape
    offsets: tuple[int, ...]  # where this region starts in it
    local: tuple[slice, ...]  # which part of the local tensor it is

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.local)


def pieces(key: str, name: str, local_shape: tuple[int, ...], model_cfg, tp: int,
           tp_rank: int, ep: int = 1, ep_rank: int = 0) -> list[Piece]:
    """Where the local tensor of parameter `name` (serial name) sits in the stored tensors, under
    the prefix `key` (e.g. "model/", "optim/exp_avg/"); ep, ep_rank: the expert-parallel slice."""
    full = tuple(slice(0, n) for n in local_shape)
    split: Split | None = split_of(name, model_cfg) if local_shape else None
    if split is None:
        return [Piece(key + name, tuple(local_shape), (0,) * len(local_shape), full)]
    if split.axis == "ep":
        tp, tp_rank = ep, ep_rank
    d = split.dim
    rest = lambda size: tuple(size if i == d else n for i, n in enumerate(local_shape))  # noqa: E731
    at = lambda start: tuple(start if i == d else 0 for i in range(len(local_shape)))  # noqa: E731
    if split.vocab:  # this rank's rows of the padded vocabulary, the padding never stored
        rows = local_shape[d]
        start = tp_rank * rows
        valid = max(0, min(rows, model_cfg.vocab_size - start))
        if not valid:
            return []
        local = tuple(slice(0, valid) if i == d else s for i, s in enumerate(full))
        return [Piece(key + name, rest(model_cfg.vocab_size), at(start), local)]
    if not split.blocks:
        rows = local_shape[d]
        return [Piece(key + name, rest(rows * tp), at(tp_rank * rows), full)]
    out, cursor = [], 0
    for label, block in zip(split.labels, split.blocks, strict=True):
        rows = block // tp
        local = tuple(slice(cursor, cursor + rows) if i == d else s for i, s in enumerate(full))
        out.append(Piece(f"{key}{name}:{label}", rest(block), at(tp_rank * rows), local))
        cursor += rows
    return out


class ShardWriter:
    """Collects the chunks one rank owns, writes them to one safetensors file, returns the index."""

    def __init__(self, file_name: str, copy: bool = False):
        self.file = file_name
        self.copy = copy  # snapshot: never keep a view of a tensor training will go on changing
        self.tensors: dict[str, torch.Tensor] = {}
        self.index: dict[str, dict] = {}
        self._storages: set[int] = set()

    def add(self, piece: Piece, local: torch.Tensor) -> None:
        chunk = local.detach()[piece.local].to("cpu").contiguous()
        # safetensors refuses tensors that share memory (blocks of one fused tensor, one step count
        # shared by every parameter): those get their own copy.
        ptr = chunk.untyped_storage().data_ptr()
        if ptr in self._storages or (self.copy and ptr == local.untyped_storage().data_ptr()):
            chunk = chunk.clone()
        self._storages.add(chunk.untyped_storage().data_ptr())
        name = chunk_name(piece.key, piece.offsets)
        self.tensors[name] = chunk
        dtype = str(chunk.dtype).replace("torch.", "")
        entry = self.index.setdefault(piece.key, {"shape": list(piece.shape), "dtype": dtype, "chunks": []})
        entry["chunks"].append({"file": self.file, "name": name, "offsets": list(piece.offsets),
                                "sizes": list(chunk.shape)})

    @property
    def nbytes(self) -> int:
        """What the tensors take on disk (the header aside)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def write(self, directory: Path) -> Path | None:
        if not self.tensors:
            return None
        from safetensors.torch import save_file
        path = Path(directory) / self.file
        save_file(self.tensors, str(path))
        return path


def merge_indexes(indexes: list[dict]) -> dict:
    """One index from every rank's: chunks of the same stored tensor concatenated."""
    out: dict[str, dict] = {}
    for index in indexes:
        for key, entry in index.items():
            mine = out.setdefault(key, {"shape": entry["shape"], "dtype": entry["dtype"], "chunks": []})
            if mine["shape"] != entry["shape"]:
                raise RuntimeError(f"ranks disagree on the global shape of {key}: {mine['shape']} vs "
                                   f"{entry['shape']}")
            mine["chunks"].extend(entry["chunks"])
    for entry in out.values():
        entry["chunks"].sort(key=lambda c: c["offsets"])
    return dict(sorted(out.items()))


class Store:
    """Reads regions of stored tensors from a checkpoint directory (already verified)."""

    def __init__(self, directory: Path, index: dict):
        self.dir = Path(directory)
        self.index = index
        self._open: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _file(self, name: str):
        if name not in self._open:
            from safetensors import SafetensorError, safe_open
            try:
                self._open[name] = safe_open(str(self.dir / name), framework="pt")
            except (SafetensorError, OSError) as e:
                why = " ".join(str(e).split())[:120]
                raise CheckpointError(f"checkpoint file {str(self.dir / name)!r} is not a readable "
                                      f"safetensors file ({why}); delete {str(self.dir)!r} to fall back to "
                                      f"an earlier checkpoint.") from None
        return self._open[name]

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of stored tensor `key`, assembled from its chunks."""
        if key not in self.index:
            raise CheckpointError(f"checkpoint {str(self.dir)!r} holds no tensor {key!r}; it was written for "
                                  f"another model (use the config.yaml stored with it).")
        entry = self.index[key]
        shape = entry["shape"]
        if len(shape) != len(sizes) or any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
            raise CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(shape)}, which does not fit "
                                  f"this model (use the config.yaml stored with the checkpoint).")
        if not sizes:  # a scalar (e.g. AdamW's step): one chunk holds it
            chunk = entry["chunks"][0]
            return self._file(chunk["file"]).get_tensor(chunk["name"])
        out = torch.empty(sizes, dtype=DTYPES[entry["dtype"]])
        covered = 0
        for chunk in entry["chunks"]:
            lo = [max(o, c) for o, c in zip(offsets, chunk["offsets"], strict=True)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk["offsets"], chunk["sizes"],
                                                        strict=True)]
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            src = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk["offsets"], strict=True))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))
            part = self._file(chunk["file"]).get_slice(chunk["name"])
            out[dst] = part[src]
            covered += out[dst].numel()
            if covered >= out.numel():
                break
        if covered != out.numel():
            raise CheckpointError(f"checkpoint {str(self.dir)!r} holds only part of {key!r}; it is "
                                  f"incomplete (delete it to fall back to an earlier checkpoint).")
        return out

    def read_into(self, local: torch.Tensor, piece_list: list[Piece]) -> None:
        """Fill a local tensor from its pieces (rows no piece covers, i.e. vocabulary padding, = 0)."""
        with torch.no_grad():
            if len(piece_list) != 1 or piece_list[0].sizes != tuple(local.shape):
                local.zero_()
            for p in piece_list:
                local[p.local] = self.read(p.key, p.offsets, p.sizes).to(local.dtype)
