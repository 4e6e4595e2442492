"""`megatron-lite prepare-data`: local sources (streamed) -> tokenizer -> memory-mapped token files with a
document index and metadata, split into train and validation.

Output directory layout (written to a temporary sibling and renamed into place when complete,
so a half-written directory never looks prepared):
    meta.json            tokenizer spec (type, file, separator), vocab size, separator (eot) id, dtype,
                         per-split token/document counts
    tokenizer.json       (bpe only) the HF tokenizers file
    {train,val}.bin      token ids, each document followed by the separator id (meta.json names it)
    {train,val}.idx.npy  int64 start offset of every document in the .bin

At corpus scale. The sources are streamed (never loaded whole), in up to three passes:
    1. scan      count the non-empty documents (and their UTF-8 bytes): the train/validation split
                 is a seeded permutation of the document numbers, so it needs their count first;
    2. sample    (--tokenizer bpe only) train the BPE on a seeded random sample of about
                 `bpe_sample_bytes` of the training documents (all of them when the corpus is
                 smaller): its merges settle long before a web-scale corpus ends, and the trainer's
                 memory grows with the text it sees;
    3. tokenize  chunks of about `chunk_chars` characters go to `workers` processes (one core each:
                 HF tokenizers' own threads are turned off there) and their tokens are appended to
                 the .bin and .idx.npy files in corpus order as they come back, at most two chunks
                 per worker in flight.
Memory is therefore bounded by the chunks in flight, the tokenizer, and one byte per document (the
split), whatever the corpus size; the output is the same, byte for byte, for any number of workers.
The run is atomic, not resumable: an interrupted one (an exception, Ctrl-C, SIGTERM) removes its
temporary directory and a rerun starts over.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

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
# One task for a worker: ~1M characters is about a second of BPE on one core, long enough that handing
# it over (pickling the text and the tokens) costs ~1% (the main process measured 2-3% of the workers'
# CPU in all), short enough that a worker's transient memory for it (its HF Encodings) stays at tens
# of MB and 2 x workers of them in flight stay small.
CHUNK_CHARS = 1 << 20
BPE_SAMPLE_BYTES = 256_000_000
READ_BATCH = 256  # documents per batch read from a source


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


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM allocation), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity mask
        return os.cpu_count() or 1


def _hf_datasets():
    # Everything is local: never let datasets reach for the Hub.
    export_env({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, overwrite=False)
    import datasets
    datasets.disable_progress_bars()
    return datasets


class Corpus:
    """The documents of `sources`, streamed in a fixed order each time `batches()` is called: saved
    datasets (in the order given), then every text file (one document per file), every JSON Lines /
    JSON file, every parquet file. Empty and non-string documents are left out; the document number
    (the split's key) counts the rest. Checks every path when built, reading nothing.

    Files are read here, not through HF `datasets`' streaming mode, which imports torch (~200 MB of
    memory in the reading process) and converts row by row; the documents are those `datasets` gives:
    a text file decoded as UTF-8 with errors replaced and universal newlines, a JSON Lines row's field,
    a parquet column. Saved datasets are opened with `datasets.load_from_disk` (memory-mapped)."""

    def __init__(self, sources: list[str], text_field: str, max_bytes: int | None = None):
        if not sources:
            raise DataError("no data source given; pass --source stdlib or one or more local paths.")
        self.sources, self.text_field = sources, text_field
        self.saved: list[Path] = []
        self.files: dict[str, list[Path]] = {"text": [], "json": [], "parquet": []}
        for src in sources:
            if src == "stdlib":
                self.files["text"] += stdlib_files(max_bytes)
                continue
            path = Path(src)
            if not path.exists():
                raise DataError(f"data source {src!r} does not exist; pass an existing file or "
                                f"directory (or 'stdlib' for the embedded corpus).")
            if path.is_dir() and any((path / name).exists() for name in
                                     ("dataset_info.json", "dataset_dict.json", "state.json")):
                self.saved.append(path)
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
                self.files[kind].append(f)
        if not self.saved and not any(self.files.values()):
            raise DataError(f"data sources {sources} hold no readable files; pass text, JSON Lines, "
                            f"parquet files or a save_to_disk directory.")

    def batches(self, size: int = READ_BATCH) -> Iterator[list[str]]:
        """Lists of up to `size` non-empty documents, in corpus order."""
        readers = [(str(p), lambda p=p: self._saved(p)) for p in self.saved]
        readers += [(str(f), lambda f=f: self._text(f)) for f in self.files["text"]]
        readers += [(str(f), lambda f=f: self._json(f)) for f in self.files["json"]]
        readers += [(str(f), lambda f=f: self._parquet(f)) for f in self.files["parquet"]]
        batch: list[str] = []
        for where, read in readers:
            try:
                for texts in read():
                    batch += [t for t in texts if isinstance(t, str) and t.strip()]
                    if len(batch) >= size:
                        yield batch
                        batch = []
            except DataError:
                raise
            except (OSError, ValueError) as e:  # what the readers raise for a damaged file
                raise DataError(f"could not read {where!r} ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]}); check the file is valid.") from None
        if batch:
            yield batch

    def _text(self, path: Path) -> Iterator[list[str]]:
        with open(path, encoding="utf-8", errors="replace") as f:  # universal newlines, as `datasets`
            yield [f.read()]

    def _json(self, path: Path) -> Iterator[list]:
        """JSON Lines (one object per line), or one JSON array of objects (read whole: it cannot stream).
        A row without the field is an empty document, as in `datasets`; a file where no row has it is
        refused."""
        with open(path, encoding="utf-8") as f:
            first = f.read(1)
            while first.isspace():
                first = f.read(1)
            f.seek(0)
            rows = enumerate(json.load(f), 1) if first == "[" else self._json_lines(path, f)
            batch, fields = [], None
            for number, row in rows:
                if not isinstance(row, dict):
                    raise DataError(f"{str(path)!r} row {number} is a JSON {type(row).__name__}, not an "
                                    f"object; write one JSON object per document.")
                text = row.get(self.text_field)
                if self.text_field in row:
                    fields = []
                elif fields is None:
                    fields = list(row)
                if isinstance(text, str) and not text.isascii():
                    _check_unicode(text, f"row {number} of {str(path)!r}")
                batch.append(text)
                if len(batch) >= READ_BATCH:
                    yield batch
                    batch = []
            if fields:
                self._no_field(str(path), fields)
            yield batch

    @staticmethod
    def _json_lines(path: Path, f) -> Iterator[tuple[int, object]]:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"line {number} of {str(path)!r} is not valid JSON ({e.msg}); fix or "
                                    f"remove it.") from None

    def _parquet(self, path: Path) -> Iterator[list]:
        import pyarrow.parquet as pq  # installed with `datasets`
        file = pq.ParquetFile(path)
        if self.text_field not in file.schema_arrow.names:
            self._no_field(str(path), file.schema_arrow.names)
        for table in file.iter_batches(batch_size=READ_BATCH, columns=[self.text_field]):
            yield table.column(0).to_pylist()

    def _saved(self, path: Path) -> Iterator[list]:
        datasets = _hf_datasets()
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"could not read the saved dataset {str(path)!r} ({type(e).__name__}); check it "
                            f"was written by Dataset.save_to_disk.") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train" if "train" in ds else next(iter(ds))]
        if self.text_field not in ds.column_names:
            self._no_field(str(path), ds.column_names)
        for batch in ds.select_columns([self.text_field]).iter(batch_size=READ_BATCH):
            yield batch[self.text_field]

    def _no_field(self, where: str, fields: list[str]):
        raise DataError(f"{where} has no {self.text_field!r} field (fields: {', '.join(fields)}); "
                        f"pass --text-field with the name of the text column.")


def _check_unicode(text: str, where: str) -> None:
    """JSON can escape half a surrogate pair (\\ud800), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where} holds {e.object[e.start:e.end]!r}, half of a UTF-16 surrogate pair, which "
                        f"is not text; repair or remove that document.") from None


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


class Progress:
    """A tqdm bar over documents with tokens/s beside it on a terminal; elsewhere (a batch job's log
    file) a log line at each tenth of the documents instead, at most one per 10 s."""

    def __init__(self, desc: str, total: int | None, unit: str = "doc"):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                        mininterval=1.0, disable=None)  # None: shown on a terminal only
        self.desc, self.total, self.done, self.tokens = desc, total, 0, 0
        self.t0 = self.logged = time.perf_counter()
        self.next_log = 0.1

    def update(self, documents: int, tokens: int = 0) -> None:
        self.done += documents
        self.tokens += tokens
        self.bar.update(documents)
        if tokens:
            self.bar.set_postfix_str(f"{self.rate() / 1e6:.2f}M tokens/s", refresh=False)
        if self.bar.disable and self.total and self.done >= self.next_log * self.total:
            self.next_log = (int(10 * self.done / self.total) + 1) / 10
            if time.perf_counter() - self.logged < 10:  # a short run needs no progress lines
                return
            self.logged = time.perf_counter()
            more = f", {self.tokens:,} tokens ({self.rate() / 1e6:.2f}M/s)" if self.tokens else ""
            log.info(f"{self.desc}: {self.done:,}/{self.total:,} documents{more}")

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float:
        return self.tokens / max(self.seconds(), 1e-9)

    def close(self) -> None:
        self.bar.close()


def _scan(corpus: Corpus) -> tuple[int, int]:
    """Pass 1: the number of documents and their UTF-8 bytes."""
    n, nbytes = 0, 0
    progress = Progress("scanning", None)
    try:
        for texts in corpus.batches():
            n += len(texts)
            nbytes += sum(len(t.encode("utf-8")) for t in texts)
            progress.update(len(texts))
    finally:
        progress.close()
    return n, nbytes


def _validation_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which documents are held out: the first round(val_fraction * n) of a permutation seeded by `seed`
    (at least one, and at least one left to train on). One byte per document; the permutation is freed."""
    import numpy as np
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[order[:n_val]] = True
    return mask


def _bpe_sample(corpus: Corpus, is_val: np.ndarray, total_bytes: int, sample_bytes: int | None,
                seed: int) -> Iterator[str]:
    """Pass 2: the training documents the BPE learns from: all of them when the corpus holds at most
    `sample_bytes` (None: no limit), else each with probability sample_bytes / total_bytes, drawn from
    a generator seeded by `seed` in document order (so the sample is a function of seed and corpus)."""
    import numpy as np
    rate = 1.0 if sample_bytes is None or total_bytes <= sample_bytes else sample_bytes / total_bytes
    if rate < 1.0:
        log.info(f"training BPE on a random ~{sample_bytes / 1e6:,.0f} MB of the {total_bytes / 1e6:,.0f} MB "
                 f"corpus's training documents (--bpe-sample-bytes)")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the split's generator is (seed)
    doc = 0
    for texts in corpus.batches():
        keep = ~is_val[doc:doc + len(texts)] & (rng.random(len(texts)) < rate)
        doc += len(texts)
        yield from (t for t, k in zip(texts, keep, strict=True) if k)


def encode_chunk(tok: Tokenizer, texts: list[str], is_val: np.ndarray, dtype) -> dict:
    """{split: (tokens, lengths)}: the documents of each split, each followed by the separator,
    concatenated, and their lengths in tokens (separator included)."""
    import numpy as np
    out = {}
    for split, held_out in (("train", False), ("val", True)):
        docs = [t for t, v in zip(texts, is_val, strict=True) if v == held_out]
        arrays = tok.encode_arrays(docs, dtype)
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        out[split] = (np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype), lengths)
    return out


def _portable(tok: Tokenizer, directory: Path):
    """What a worker is given to rebuild `tok`: the bytes tokenizer itself, or the tokenizer.json already
    saved in `directory` and the separator. Not the vocabulary itself: starting a spawned process writes
    its arguments down a pipe that the child must read, and megabytes of them would block this process
    for good if the child died first (e.g. a script without `if __name__ == "__main__":`)."""
    return tok if isinstance(tok, ByteTokenizer) else (str(directory / "tokenizer.json"), tok.separator)


def _worker(portable, dtype, tasks, results) -> None:
    """A tokenizing process: (number, texts, is_val) from `tasks` until None, (number, encoded) or
    (number, error text) to `results`."""
    import multiprocessing
    from multiprocessing.connection import wait

    from tokenizers import Tokenizer as HFTokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which stops us
    # One process, one core: HF tokenizers would otherwise run a thread per core in every worker.
    export_env({"TOKENIZERS_PARALLELISM": "false"}, overwrite=False)
    # A killed main process (SIGKILL, the out-of-memory killer) cannot stop us, and may have died
    # halfway through sending a task, which a read would wait for forever: a watchdog ends us instead.
    def exit_with_parent():
        wait([multiprocessing.parent_process().sentinel])
        os._exit(1)
    threading.Thread(target=exit_with_parent, daemon=True).start()
    if isinstance(portable, ByteTokenizer):
        tok = portable
    else:
        path, separator = portable
        tok = BPETokenizer(HFTokenizer.from_file(path), separator, f"tokenizer file {path!r}")
    while (task := tasks.get()) is not None:
        number, texts, is_val = task
        try:
            results.put((number, encode_chunk(tok, texts, is_val, dtype)))
        except Exception as e:  # noqa: BLE001 - reported to the main process, which raises it
            results.put((number, f"{type(e).__name__}: {e}"))


class Pool:
    """`workers` tokenizing processes (spawned: a fresh interpreter holds only the tokenizer, and no
    thread pool of the parent is forked) fed chunks in order; `next_result()` hands them back in order."""

    def __init__(self, portable, dtype, workers: int):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.tasks, self.done = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(portable, dtype, self.tasks, self.done), daemon=True,
                                  name=f"prepare-data worker {i}") for i in range(workers)]
        for p in self.procs:
            p.start()
        self.sent = self.received = 0
        self.early: dict[int, dict] = {}  # results that overtook an earlier chunk

    def submit(self, texts: list[str], is_val: np.ndarray) -> None:
        self.tasks.put((self.sent, texts, is_val))
        self.sent += 1

    def in_flight(self) -> int:
        return self.sent - self.received

    def next_result(self) -> dict:
        """The result of the oldest chunk not yet returned (waits for it)."""
        while self.received not in self.early:
            try:
                number, result = self.done.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(
                        f"{dead[0].name} exited (code {dead[0].exitcode}: -9 is a kill, e.g. by the "
                        f"out-of-memory killer; else its error is above, and a script that calls prepare() "
                        f"needs `if __name__ == '__main__':`); nothing was written.") from None
                continue
            if isinstance(result, str):
                raise RuntimeError(f"tokenizing failed in a worker: {result}")
            self.early[number] = result
        self.received += 1
        return self.early.pop(self.received - 1)

    def close(self, ok: bool) -> None:
        if ok:
            for _ in self.procs:
                self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=10 if ok else 0)
            if p.is_alive():
                p.terminate()
                p.join()
        for q in (self.tasks, self.done):
            q.cancel_join_thread()  # unsent tasks of a failed run must not keep us waiting
            q.close()


class SplitWriter:
    """Appends one split's tokens to {split}.bin and its document starts to {split}.idx.npy (np.save's
    format: the header holds the document count, known from the scan, so the offsets stream after it)."""

    def __init__(self, directory: Path, split: str, documents: int):
        import numpy as np
        self.split, self.expected, self.documents, self.tokens = split, documents, 0, 0
        self.bin = open(directory / f"{split}.bin", "wb")
        self.idx = open(directory / f"{split}.idx.npy", "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)), "fortran_order": False,
                  "shape": (documents,)}
        np.lib.format.write_array_header_1_0(self.idx, header)

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        import numpy as np
        starts = np.cumsum(lengths, dtype=np.int64) - lengths + self.tokens
        self.bin.write(memoryview(np.ascontiguousarray(tokens)))  # the array's own bytes, not a copy
        self.idx.write(memoryview(starts))
        self.tokens += len(tokens)
        self.documents += len(lengths)

    def close(self, check: bool = True) -> dict:
        self.bin.close()
        self.idx.close()
        if check and self.documents != self.expected:
            raise DataError(f"the sources changed while being prepared ({self.split} got {self.documents} "
                            f"documents, the scan counted {self.expected}); prepare them again when they "
                            f"are not being written.")
        return {"tokens": self.tokens, "documents": self.documents}


def _chunks(corpus: Corpus, chunk_chars: int) -> Iterator[tuple[int, list[str]]]:
    """(number of the first document, documents) of about `chunk_chars` characters each, in order."""
    first, texts, chars = 0, [], 0
    for batch in corpus.batches():
        for t in batch:
            texts.append(t)
            chars += len(t)
            if chars >= chunk_chars:
                yield first, texts
                first, texts, chars = first + len(texts), [], 0
    if texts:
        yield first, texts


def _tokenize(corpus: Corpus, tok: Tokenizer, is_val: np.ndarray, directory: Path, dtype, workers: int,
              chunk_chars: int, total_bytes: int) -> dict:
    """Pass 3: every document into its split's files, in corpus order; {split: counts}."""
    writers = {s: SplitWriter(directory, s, int(n)) for s, n in
               (("train", (~is_val).sum()), ("val", is_val.sum()))}
    progress = Progress("tokenizing", len(is_val))

    def write(result: dict) -> None:
        for split, (tokens, lengths) in result.items():
            writers[split].append(tokens, lengths)
        progress.update(sum(len(lengths) for _, lengths in result.values()),
                        sum(len(tokens) for tokens, _ in result.values()))

    # One worker is a process too, so that `--workers N` always means N single-threaded tokenizers;
    # only a corpus of a single chunk is tokenized here (starting a process would cost more).
    pool, ok = Pool(_portable(tok, directory), dtype, workers) if total_bytes > chunk_chars else None, False
    try:
        for first, texts in _chunks(corpus, chunk_chars):
            if first + len(texts) > len(is_val):
                raise DataError(f"the sources changed while being prepared (more than the {len(is_val):,} "
                                f"documents the scan counted); prepare them again when they are not being "
                                f"written.")
            flags = is_val[first:first + len(texts)]
            if pool is None:
                write(encode_chunk(tok, texts, flags, dtype))
                continue
            while pool.in_flight() >= 2 * workers:  # bounded: the reader never runs ahead of the writer
                write(pool.next_result())
            pool.submit(texts, flags)
        while pool is not None and pool.in_flight():
            write(pool.next_result())
        ok = True
    finally:
        if pool is not None:
            pool.close(ok)
        progress.close()
        counts = {s: w.close(check=ok) for s, w in writers.items()}  # the files close on failure too
    seconds = progress.seconds()
    how = f"{workers} worker process{'es' * (workers > 1)}" if pool is not None else "this process"
    log.info(f"tokenized {len(is_val):,} documents ({total_bytes / 1e6:,.1f} MB) into {progress.tokens:,} "
             f"tokens in {seconds:.1f}s with {how}: "
             f"{progress.tokens / seconds / 1e6:.3f}M tokens/s, {total_bytes / seconds / 1e6:.2f} MB/s")
    return counts


@contextmanager
def _sigterm_raises():
    """SIGTERM (a batch system's time limit, `kill`) unwinds like Ctrl-C, so the temporary directory is
    removed; only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def prepare(sources: list[str], out: str | Path, tokenizer: str = "bpe", vocab_size: int = 4096,
            val_fraction: float = 0.05, seed: int = 1234, text_field: str = "text",
            max_bytes: int | None = 8_000_000, force: bool = False, separator: str | None = None,
            workers: int | None = None, bpe_sample_bytes: int | None = BPE_SAMPLE_BYTES,
            chunk_chars: int = CHUNK_CHARS) -> Path:
    """Prepare `sources` into `out`; returns out. An already prepared `out` is kept unless force.
    `separator` (a token, or eos / bos) ends documents with a loaded tokenizer (see data/tokenizer.py).
    `workers` tokenizing processes (None: one per core this process may use); a corpus of one chunk is
    tokenized in this process. `bpe_sample_bytes` bounds the BPE's training text (None: all of it)."""
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
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1 (default: one per core, here "
                        f"{default_workers()}).")
    if bpe_sample_bytes is not None and bpe_sample_bytes < 1:
        raise DataError(f"--bpe-sample-bytes {bpe_sample_bytes} must be positive (0 on the command line: "
                        f"train on every training document).")
    if chunk_chars < 1:
        raise DataError(f"chunk_chars={chunk_chars} must be positive.")
    given = _given_tokenizer(tokenizer, separator)  # before reading any source: a bad one costs nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))
    if stale:
        log.warning(f"{out.parent} holds {', '.join(stale)}: left by a killed prepare-data run (or one still "
                    f"running); delete them to free the space.")
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _sigterm_raises():
            corpus = Corpus(sources, text_field, max_bytes=max_bytes)
            n, total_bytes = _scan(corpus)
            if n < 2:
                raise DataError(f"data sources {sources} hold {n} non-empty document(s); at least 2 are "
                                f"needed to split train from validation.")
            is_val = _validation_mask(n, val_fraction, seed)
            log.info(f"found {n:,} documents, {total_bytes / 1e6:,.1f} MB ({n - int(is_val.sum()):,} train, "
                     f"{int(is_val.sum()):,} val)")
            tok = given
            if tok is None:
                # The tokenizer learns from the training split only: validation stays unseen.
                tok = BPETokenizer.train(_bpe_sample(corpus, is_val, total_bytes, bpe_sample_bytes, seed),
                                         vocab_size)
            dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
            meta = {"format": FORMAT_VERSION, "tokenizer": tok.save(tmp), "vocab_size": tok.vocab_size,
                    "eot_id": tok.eot_id, "dtype": np.dtype(dtype).name, "sources": sources,
                    "seed": seed, "splits": {}}
            workers = min(workers, max(1, -(-total_bytes // chunk_chars)))  # no idle processes
            counts = _tokenize(corpus, tok, is_val, tmp, dtype, workers, chunk_chars, total_bytes)
            for split in ("val", "train"):  # meta.json's order since format 1
                info = meta["splits"][split] = counts[split]
                log.info(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens")
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
