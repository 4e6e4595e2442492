"""`megatron-lite prepare-data`: local sources -> HF `datasets` -> tokenizer -> memory-mapped
token files with a document index and metadata, split into train and validation.

Output directory layout (written to a temporary sibling and renamed into place when complete,
so a half-written directory never looks prepared):
    meta.json            tokenizer spec (type, file, separator), vocab size, separator (eot) id, dtype,
                         per-split token/document counts
    tokenizer.json       (bpe only) the HF tokenizers file
    {train,val}.bin      token ids, each document followed by the separator id (meta.json names it)
    {train,val}.idx.npy  int64 start offset of every document in the .bin
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..distributed.env import export as export_env
from .tokenizer import EOT, BPETokenizer, ByteTokenizer, DataError, Tokenizer

if TYPE_CHECKING:
    import numpy as np  # loaded when preparing: `megatron-lite --help` imports this module

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".py", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
# Stdlib corners that are mostly test data, generated tables or vendored copies of other code.
STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "lib2to3", "ensurepip", "turtledemo",
               "__pycache__", "pydoc_data", "encodings"}
FORMAT_VERSION = 1


def stdlib_files(max_bytes: int | None) -> list[Path]:
    """The embedded default corpus: this Python's own standard-library sources, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in STDLIB_SKIP or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        files.append(path)
    return _cap(files, max_bytes)


def _cap(files: list[Path], max_bytes: int | None) -> list[Path]:
    if max_bytes is None:
        return files
    kept, total = [], 0
    for f in files:
        size = f.stat().st_size
        if kept and total + size > max_bytes:
            break
        kept.append(f)
        total += size
    return kept


def _hf_datasets():
    # Everything is local: never let datasets reach for the Hub.
    export_env({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, overwrite=False)
    import datasets
    datasets.disable_progress_bars()
    return datasets


def load_documents(sources: list[str], text_field: str, cache_dir: str, max_bytes: int | None = None):
    """Load every source into one HF Dataset with a single `text` column."""
    datasets = _hf_datasets()
    if not sources:
        raise DataError("no data source given; pass --source stdlib or one or more local paths.")
    by_kind: dict[str, list[str]] = {"text": [], "json": [], "parquet": []}
    parts = []
    for src in sources:
        if src == "stdlib":
            by_kind["text"] += [str(p) for p in stdlib_files(max_bytes)]
            continue
        path = Path(src)
        if not path.exists():
            raise DataError(f"data source {src!r} does not exist; pass an existing file or "
                            f"directory (or 'stdlib' for the embedded corpus).")
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists()):
            try:
                parts.append(_saved_dataset(datasets, path, text_field))
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"could not read the saved dataset {src!r} ({type(e).__name__}); check it "
                                f"was written by Dataset.save_to_disk.") from None
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            suffix = f.suffix.lower()
            kind = ("text" if suffix in TEXT_SUFFIXES else "json" if suffix in JSON_SUFFIXES
                    else "parquet" if suffix in PARQUET_SUFFIXES else None)
            if kind is None:
                if path.is_dir():
                    continue  # unrelated files inside a directory source are skipped
                raise DataError(f"data source {src!r} has an unknown type; use .txt/.py/.md text, "
                                f".jsonl/.json lines, .parquet, or a save_to_disk directory.")
            by_kind[kind].append(str(f))
    try:
        if by_kind["text"]:
            # One document per file, as a language model of whole files should see them.
            parts.append(datasets.load_dataset("text", data_files=by_kind["text"], sample_by="document",
                                               split="train", cache_dir=cache_dir,
                                               encoding_errors="replace"))
        for kind in ("json", "parquet"):
            if by_kind[kind]:
                ds = datasets.load_dataset(kind, data_files=by_kind[kind], split="train", cache_dir=cache_dir)
                parts.append(_text_column(ds, text_field, ", ".join(by_kind[kind][:3])))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not read the data sources ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}); check the files are valid.") from None
    if not parts:
        raise DataError(f"data sources {sources} hold no readable files; pass text, JSON Lines, "
                        f"parquet files or a save_to_disk directory.")
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds = ds.filter(lambda t: isinstance(t, str) and bool(t.strip()), input_columns="text")
    if len(ds) < 2:
        raise DataError(f"data sources {sources} hold {len(ds)} non-empty document(s); at least 2 are "
                        f"needed to split train from validation.")
    return ds


def _saved_dataset(datasets, path: Path, text_field: str):
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return _text_column(ds, text_field, str(path))


def _text_column(ds, text_field: str, where: str):
    if text_field not in ds.column_names:
        raise DataError(f"{where} has no {text_field!r} field (fields: {', '.join(ds.column_names)}); "
                        f"pass --text-field with the name of the text column.")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" \
        else ds.select_columns(["text"])


def _batches(ds, indices: np.ndarray, size: int = 512) -> Iterator[list[str]]:
    for i in range(0, len(indices), size):
        yield ds[indices[i:i + size].tolist()]["text"]


def _write_split(path: Path, tok: Tokenizer, ds, indices: np.ndarray, dtype) -> dict:
    import numpy as np
    starts, n = [], 0
    with open(path / "bin.tmp", "wb") as f:
        for texts in _batches(ds, indices):
            for ids in tok.encode_batch(texts):
                starts.append(n)
                arr = np.asarray(ids + [tok.eot_id], dtype=dtype)
                arr.tofile(f)
                n += len(arr)
    return {"tokens": n, "documents": len(starts), "starts": np.asarray(starts, dtype=np.int64)}


def _given_tokenizer(tokenizer: str, separator: str | None) -> Tokenizer | None:
    """--tokenizer bytes, or a tokenizer.json (or a directory holding one: a checkpoint's, an HF
    model's); None for 'bpe' (trained on the documents). --separator only applies to a loaded one."""
    if tokenizer == "bytes" or tokenizer == "bpe":
        if separator not in (None, EOT):
            raise DataError(f"--separator {separator!r} applies to a loaded tokenizer (--tokenizer FILE); "
                            f"--tokenizer {tokenizer} always ends documents with {EOT!r}.")
        return ByteTokenizer() if tokenizer == "bytes" else None
    path = Path(tokenizer)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"--tokenizer {tokenizer!r} is neither 'bpe', 'bytes' nor an existing tokenizer.json "
                        f"file (or a directory holding one).")
    tok = BPETokenizer.from_file(path, separator)
    tok.log_separator()
    return tok


def prepare(sources: list[str], out: str | Path, tokenizer: str = "bpe", vocab_size: int = 4096,
            val_fraction: float = 0.05, seed: int = 1234, text_field: str = "text",
            max_bytes: int | None = 8_000_000, force: bool = False, separator: str | None = None) -> Path:
    """Prepare `sources` into `out`; returns out. An already prepared `out` is kept unless force.
    `separator` (a token, or eos / bos) ends documents with a loaded tokenizer (see data/tokenizer.py)."""
    import numpy as np
    out = Path(out)
    if (out / "meta.json").is_file() and not force:
        log.info(f"data already prepared in {out} (pass --force to rebuild)")
        return out
    if out.exists() and not (out / "meta.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {str(out)!r} exists and is not a prepared data directory; pass a new "
                        f"or empty directory (nothing there is deleted).")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive).")
    if tokenizer == "bpe" and not 256 + 1 < vocab_size <= 2**31:
        raise DataError(f"--vocab-size {vocab_size} must exceed 257 (the byte alphabet plus end-of-text).")
    given = _given_tokenizer(tokenizer, separator)  # before reading any source: a bad one costs nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ds = load_documents(sources, text_field, cache_dir=str(tmp / "hf_cache"), max_bytes=max_bytes)
        order = np.random.default_rng(seed).permutation(len(ds))
        n_val = max(1, round(val_fraction * len(ds)))
        n_val = min(n_val, len(ds) - 1)
        splits = {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
        log.info(f"loaded {len(ds)} documents ({len(splits['train'])} train, {n_val} val)")

        tok = given
        if tok is None:
            # The tokenizer learns from the training split only: validation stays unseen.
            texts = (t for batch in _batches(ds, splits["train"]) for t in batch)
            tok = BPETokenizer.train(texts, vocab_size)
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        meta = {"format": FORMAT_VERSION, "tokenizer": tok.save(tmp), "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id, "dtype": np.dtype(dtype).name, "sources": sources,
                "seed": seed, "splits": {}}
        for split, idx in splits.items():
            info = _write_split(tmp, tok, ds, idx, dtype)
            os.replace(tmp / "bin.tmp", tmp / f"{split}.bin")
            np.save(tmp / f"{split}.idx.npy", info.pop("starts"))
            meta["splits"][split] = info
            log.info(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens")
        shutil.rmtree(tmp / "hf_cache", ignore_errors=True)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        old = None
        if out.exists():  # a prepared directory rebuilt with --force (or an empty one): swap it out
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(f"prepared {out} in {time.time() - t0:.1f}s (vocab {tok.vocab_size}, {meta['dtype']})")
    return out
