"""prepare-data at corpus scale: any number of workers writes the same bytes; memory does not grow with
the corpus (the output streams to disk, a bounded number of chunks in flight); an interrupted run
leaves nothing that looks prepared and a rerun succeeds; the BPE learns from a bounded, seeded
sample; bad --workers and broken JSON are refused in one sentence."""

import json
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import DataError, TokenStore, load_tokenizer, prepare
from megatron_lite.data.prepare import Corpus, Pool, SplitWriter
from megatron_lite.data.tokenizer import BPETokenizer
from megatron_lite.distributed.env import child_environ

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one "
         "had not but what all were when we there can an your which their said caf\u00e9 na\u00efve "
         "\u2603 \u03c0 tokens").split()


def write_corpus(directory: Path, documents: int, seed: int = 0, words: int = 60) -> list[str]:
    """`documents` JSON Lines documents of about `words` words (plus a few text files), deterministic."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 2 * words)))) + "\n"
            for _ in range(documents)]
    with open(directory / "a.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[: documents - 3]):
            f.write(json.dumps({"id": i, "text": d}, ensure_ascii=i % 2 == 0) + "\n")
    for i, d in enumerate(docs[documents - 3:]):
        (directory / f"t{i}.txt").write_text(d, encoding="utf-8")
    return docs


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    """A small BPE, given to the runs that compare outputs (so they time and compare tokenizing only)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=50)) for _ in range(200)]
    BPETokenizer.train(iter(texts), 320).tok.save(str(path))
    return path


def test_any_number_of_workers_writes_the_same_bytes(tmp_path, bpe_file):
    """Chunks of ~2 KB make ~40 chunks: 1 and 3 workers (a pool each: results arrive out of order with 3)
    and one chunk in this process must write identical files, and the index is np.save's format."""
    docs = write_corpus(tmp_path / "src", 300)
    runs = {}
    for name, workers, chunk in (("in-process", 2, 10**9), ("w1", 1, 2048), ("w3", 3, 2048)):
        out = prepare([str(tmp_path / "src")], tmp_path / name, tokenizer=str(bpe_file), workers=workers,
                      chunk_chars=chunk)
        runs[name] = files_of(out)
    assert runs["w1"] == runs["in-process"] and runs["w3"] == runs["in-process"]
    store, tok = TokenStore(tmp_path / "w3"), load_tokenizer(tmp_path / "w3")
    decoded = []
    for split in ("train", "val"):
        starts = store.documents(split)
        np.save(tmp_path / "again.npy", starts)  # what the whole-corpus writer stored
        assert (tmp_path / "again.npy").read_bytes() == runs["w3"][f"{split}.idx.npy"]
        tokens = store.split(split)
        for s, e in zip(starts, list(starts[1:]) + [len(tokens)], strict=True):
            assert tokens[e - 1] == tok.eot_id
            decoded.append(tok.decode(tokens[s:e - 1].tolist()))
    assert sorted(decoded) == sorted(docs)


def test_bytes_tokenizer_with_workers_matches_in_process(tmp_path):
    write_corpus(tmp_path / "src", 120)
    a = prepare([str(tmp_path / "src")], tmp_path / "a", tokenizer="bytes", workers=2, chunk_chars=1024)
    b = prepare([str(tmp_path / "src")], tmp_path / "b", tokenizer="bytes", workers=1, chunk_chars=10**9)
    assert files_of(a) == files_of(b)


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """The main process holds a bounded number of chunks (2 per worker) and writes tokens as they come:
    its peak traced allocation (~1 MB here) stays put on a 4x larger corpus, well below the tokens it
    writes. (The workers each hold one chunk; benchmarks/bench_prepare.py measures the whole tree.)"""
    in_flight = []
    submit = Pool.submit

    def counting_submit(self, texts, is_val):
        submit(self, texts, is_val)
        in_flight.append(self.in_flight())
    monkeypatch.setattr(Pool, "submit", counting_submit)
    peaks, token_bytes = {}, {}
    write_corpus(tmp_path / "warm", 100)  # the imports a first run makes are not the corpus's memory
    prepare([str(tmp_path / "warm")], tmp_path / "warm_out", tokenizer="bytes", workers=2, chunk_chars=1024)
    for documents in (1500, 6000):
        src = tmp_path / f"src{documents}"
        write_corpus(src, documents, words=150)
        in_flight.clear()
        tracemalloc.start()
        out = prepare([str(src)], tmp_path / f"out{documents}", tokenizer="bytes", workers=2,
                      chunk_chars=16_384)
        peaks[documents] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert max(in_flight) <= 4 and len(in_flight) > 50  # many chunks, never more than 2 per worker
        token_bytes[documents] = sum((out / f"{s}.bin").stat().st_size for s in ("train", "val"))
    assert peaks[6000] < token_bytes[6000] / 4, (peaks, token_bytes)  # the output was never held whole
    # 4x the corpus: ~6 MB more tokens, yet the peak moves by less than 5% of that (chunks vary in size)
    growth = token_bytes[6000] - token_bytes[1500]
    assert abs(peaks[6000] - peaks[1500]) < 0.05 * growth, (peaks, token_bytes)


def test_an_exception_midway_leaves_nothing_and_a_rerun_succeeds(tmp_path, monkeypatch):
    write_corpus(tmp_path / "src", 200)
    clean = files_of(prepare([str(tmp_path / "src")], tmp_path / "clean", tokenizer="bytes", workers=1,
                             chunk_chars=10**9))
    appends = []
    append = SplitWriter.append

    def failing_append(self, tokens, lengths):
        appends.append(len(tokens))
        if len(appends) == 3:  # tokens already written: the interruption is mid-output
            raise KeyboardInterrupt
        append(self, tokens, lengths)
    monkeypatch.setattr(SplitWriter, "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "src")], tmp_path / "out", tokenizer="bytes", workers=2, chunk_chars=1024)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    monkeypatch.undo()
    out = prepare([str(tmp_path / "src")], tmp_path / "out", tokenizer="bytes", workers=2, chunk_chars=1024)
    assert files_of(out) == clean


def _start_cli(tmp_path: Path, src: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_lite.cli", "prepare-data", "--source", str(src),
                             "--out", str(tmp_path / "out"), *args], cwd=ROOT,
                            env=child_environ(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":  # a zombie has exited; its parent (init here) reaps it
            alive.append(pid)
    return alive


def _wait_for_tokens(tmp_path: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The temporary directory, once its train.bin holds tokens (the run is mid-output)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        for tmp in tmp_path.glob(".out.tmp-*"):
            if (tmp / "train.bin").exists() and (tmp / "train.bin").stat().st_size > 0:
                return tmp
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("prepare-data wrote no tokens in time")


@pytest.mark.slow
def test_sigterm_midway_removes_the_partial_output_and_sigkill_leaves_nothing_prepared(tmp_path, bpe_file):
    """SIGTERM (a batch system's time limit) unwinds: exit 143, nothing left. SIGKILL cannot be caught: its
    temporary directory stays, but --out does not look prepared, and the next run names the leftover
    and succeeds."""
    write_corpus(tmp_path / "src", 12_000, words=100)  # ~5 MB: seconds of BPE on one worker
    args = ("--tokenizer", str(bpe_file), "--workers", "1")
    proc = _start_cli(tmp_path, tmp_path / "src", *args)
    _wait_for_tokens(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, proc.stdout.read()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))

    proc = _start_cli(tmp_path, tmp_path / "src", *args)
    left = _wait_for_tokens(tmp_path, proc)
    workers = _children(proc.pid)
    assert workers  # the one tokenizing process
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _alive(workers) and time.monotonic() < deadline:  # orphans notice within a second or so
        time.sleep(0.1)
    assert not _alive(workers)
    with pytest.raises(DataError, match="no prepared data"):
        TokenStore(tmp_path / "out")
    proc = _start_cli(tmp_path, tmp_path / "src", "--tokenizer", str(bpe_file), "--workers", "2")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert left.name in log and "killed prepare-data run" in log
    assert TokenStore(tmp_path / "out").meta["splits"]["train"]["documents"] == 11_400


def test_bpe_learns_from_a_bounded_seeded_sample_of_training_documents(tmp_path, monkeypatch):
    docs = write_corpus(tmp_path / "src", 400)
    total = sum(len(d.encode()) for d in docs)
    seen = []
    train = BPETokenizer.train

    def recording_train(texts, vocab_size):
        kept = list(texts)
        seen.append(kept)
        return train(iter(kept), vocab_size)
    monkeypatch.setattr(BPETokenizer, "train", recording_train)
    for name, sample in (("all", None), ("a", total // 4), ("b", total // 4)):
        prepare([str(tmp_path / "src")], tmp_path / name, vocab_size=300, bpe_sample_bytes=sample,
                chunk_chars=10**9)
    everything, a, b = seen
    assert len(everything) == 380  # every training document (20 of 400 are held out)
    assert a == b  # the sample is a function of the seed
    assert 0.15 * total < sum(len(t.encode()) for t in a) < 0.35 * total
    val = set(docs) - set(everything)
    assert len(val) == 20 and not val & set(a)  # validation stays unseen


def test_bad_workers_and_sample_sizes_are_refused_in_one_sentence(tmp_path):
    for args, needle in ((["--workers", "0"], "--workers=0 must be >= 1"),
                         (["--workers", "-3"], "--workers=-3 must be >= 1"),
                         (["--bpe-sample-bytes", "-1"], "--bpe-sample-bytes=-1 must be >= 0")):
        r = subprocess.run([sys.executable, "-m", "megatron_lite.cli", "prepare-data", "--out",
                            str(tmp_path / "o"), *args], cwd=ROOT, capture_output=True, text=True,
                           env=child_environ(OMP_NUM_THREADS="1"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError, match="--workers 0 must be at least 1"):
        prepare(["stdlib"], tmp_path / "o", workers=0)


def test_broken_json_is_named_by_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"line 3 of '.*a.jsonl' is not valid JSON"):
        prepare([str(tmp_path / "a.jsonl")], tmp_path / "o", tokenizer="bytes")
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": "half a pair \\ud800 here"}\n')
    with pytest.raises(DataError, match=r"row 2 of '.*b.jsonl' holds '\\ud800', half of a UTF-16"):
        prepare([str(tmp_path / "b.jsonl")], tmp_path / "o", tokenizer="bytes")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.parametrize("change", ["grown", "shrunk"])
def test_sources_that_change_between_passes_are_refused(tmp_path, monkeypatch, change):
    write_corpus(tmp_path / "src", 50)
    batches, calls = Corpus.batches, []

    def changing(self, size=256):
        calls.append(size)
        documents = [t for texts in batches(self, size) for t in texts]
        if len(calls) > 1:  # the scan saw them all; the tokenizing pass finds one more, or one fewer
            documents = documents + ["written after the scan"] if change == "grown" else documents[:-1]
        yield documents
    monkeypatch.setattr(Corpus, "batches", changing)
    with pytest.raises(DataError, match="sources changed while being prepared"):
        prepare([str(tmp_path / "src")], tmp_path / "out", tokenizer="bytes")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_worker_that_dies_at_start_is_reported_not_waited_for(tmp_path, bpe_file):
    """A script without a main guard: each spawned worker re-runs it and fails at start. Its parent must
    name the failure within seconds, not hang writing the tokenizer to a child that is gone."""
    from tokenizers import Tokenizer
    big = Tokenizer.from_file(str(bpe_file))  # over a pipe's 64 KB, as any real vocabulary is
    big.add_special_tokens([f"<|reserved_{i}|>" for i in range(5000)])
    big.save(str(tmp_path / "tokenizer.json"))
    assert (tmp_path / "tokenizer.json").stat().st_size > 256 * 1024
    write_corpus(tmp_path / "src", 300)
    script = tmp_path / "unguarded.py"
    script.write_text(f"from megatron_lite.data import prepare\n"
                      f"prepare([{str(tmp_path / 'src')!r}], {str(tmp_path / 'out')!r}, "
                      f"tokenizer={str(tmp_path / 'tokenizer.json')!r}, workers=2, chunk_chars=2048)\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       env=child_environ(OMP_NUM_THREADS="1"), timeout=300)
    said = r.stderr[-2000:]
    assert r.returncode == 1 and "prepare-data worker" in said and "__main__" in said, said
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
