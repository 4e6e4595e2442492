"""Data preparation round trips, every source kind, the sampler's determinism, bad paths."""

import json

import numpy as np
import pytest

from megatron_lite.data import DataError, Sampler, TokenStore, load_tokenizer, prepare
from megatron_lite.data.prepare import stdlib_files

DOCS = [(f"Document {i}: caf\u00e9 \u2603 \t tabs\n  def f{i}(x):\n"
         f"      return x * {i}  # \u03c0\n") * (i % 3 + 1)
        for i in range(40)]


def decoded_documents(out):
    store, tok = TokenStore(out), load_tokenizer(out)
    docs = []
    for split in ("train", "val"):
        tokens, starts = store.split(split), store.documents(split)
        ends = list(starts[1:]) + [len(tokens)]
        for s, e in zip(starts, ends, strict=True):
            assert tokens[e - 1] == tok.eot_id  # each document closes with end-of-text
            docs.append(tok.decode(tokens[s:e - 1].tolist()))
    return store, docs


@pytest.mark.parametrize("tokenizer", ["bpe", "bytes"])
def test_text_files_round_trip(tmp_path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"doc{i:03d}.txt").write_text(d)
    (src / "ignored.bin").write_bytes(b"\x00\x01")  # unrelated files in a directory are skipped
    out = prepare([str(src)], tmp_path / "out", tokenizer=tokenizer, vocab_size=300)
    store, docs = decoded_documents(out)
    assert sorted(docs) == sorted(DOCS)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 2 and meta["splits"]["train"]["documents"] == 38
    assert store.vocab_size == (257 if tokenizer == "bytes" else 300)


def test_jsonl_parquet_and_saved_dataset_sources(tmp_path):
    import datasets
    rows = [{"id": i, "body": d} for i, d in enumerate(DOCS)]
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows[:15]))
    datasets.Dataset.from_list(rows[15:30]).to_parquet(str(tmp_path / "b.parquet"))
    datasets.Dataset.from_list(rows[30:]).save_to_disk(str(tmp_path / "saved"))
    out = prepare([str(jl), str(tmp_path / "b.parquet"), str(tmp_path / "saved")], tmp_path / "out",
                  tokenizer="bytes", text_field="body")
    _, docs = decoded_documents(out)
    assert sorted(docs) == sorted(DOCS)
    with pytest.raises(DataError, match="has no 'text' field.*--text-field"):
        prepare([str(jl)], tmp_path / "out2", tokenizer="bytes")


def test_stdlib_corpus_decodes_to_the_source_files(corpus_dir):
    _, docs = decoded_documents(corpus_dir)
    files = stdlib_files(400_000)
    originals = {f.read_text(encoding="utf-8", errors="replace") for f in files}
    assert len(docs) == len(files) and set(docs) <= originals
    assert not any("/test/" in str(f) or "/idlelib/" in str(f) for f in files)


def test_prepare_is_atomic_and_idempotent(tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("only one document")
    with pytest.raises(DataError, match="at least 2 are needed"):
        prepare([str(src)], tmp_path / "out", tokenizer="bytes")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    src.write_text("x")
    (tmp_path / "b.txt").write_text("y")
    out = prepare([str(src), str(tmp_path / "b.txt")], tmp_path / "out", tokenizer="bytes")
    before = (out / "meta.json").stat().st_mtime_ns
    prepare([str(src)], out, tokenizer="bytes")  # already prepared: kept as it is
    assert (out / "meta.json").stat().st_mtime_ns == before


def test_bad_sources_and_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "nope")], tmp_path / "o")
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(DataError, match="unknown type"):
        prepare([str(tmp_path / "x.docx")], tmp_path / "o")
    with pytest.raises(DataError, match="no prepared data.*prepare-data"):
        TokenStore(tmp_path / "nodata")
    with pytest.raises(DataError, match="--vocab-size"):
        prepare(["stdlib"], tmp_path / "o", vocab_size=100)
    # An existing directory that is not prepared data is never deleted.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    (tmp_path / "a.txt").write_text("doc a")
    (tmp_path / "b.txt").write_text("doc b")
    with pytest.raises(DataError, match="not a prepared data directory"):
        prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], mine, tokenizer="bytes", force=True)
    assert (mine / "precious.txt").read_text() == "keep me"


def test_truncated_token_file_is_detected(tmp_path, corpus_dir):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(corpus_dir, copy)
    with open(copy / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="truncated.*--force"):
        TokenStore(copy)


def test_sampler_is_a_function_of_seed_and_cursor():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = Sampler(tokens, 10, seed=5), Sampler(tokens, 10, seed=5)
    x1, y1 = a.batch(37, 6)
    x2, y2 = b.batch(37, 6)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (y1[:, :-1] == x1[:, 1:]).all()  # labels are inputs shifted by one
    # Cursor arithmetic: one batch of 6 == batches of 2 + 4 (what resume and DP slicing rely on).
    xa, _ = b.batch(37, 2)
    xb, _ = b.batch(39, 4)
    assert (np.concatenate([xa, xb]) == x1.numpy()).all()
    assert not (Sampler(tokens, 10, seed=6).batch(37, 6)[0] == x1).all()
    # Each epoch visits every window exactly once, in a new order.
    n = a.num_windows
    assert n == 99
    e0 = [a.window(i) for i in range(n)]
    e1 = [a.window(n + i) for i in range(n)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1
    with pytest.raises(DataError, match="too short"):
        Sampler(tokens[:5], 10, seed=0)


@pytest.mark.parametrize("dp, m, mb", [(1, 4, 3), (2, 2, 4), (4, 3, 2)])
def test_data_parallel_ranks_cover_the_global_batch_exactly_once(dp, m, mb):
    from megatron_lite.data.dataset import rank_micro_batch_starts
    cursor = 1000
    taken = [s + i for r in range(dp) for s in rank_micro_batch_starts(cursor, mb, m, dp, r)
             for i in range(mb)]
    assert sorted(taken) == list(range(cursor, cursor + mb * m * dp))  # none twice, none skipped
    # and serial accumulation's order: micro-batch j of rank r is global micro-batch j * dp + r
    assert rank_micro_batch_starts(cursor, mb, m, dp, dp - 1)[0] == cursor + (dp - 1) * mb


def test_tokenizer_identity_is_what_decides_the_ids(corpus_dir):
    """Equal for a tokenizer whose decoding or special-token template differs (transformers rewrites its
    post-processor on load); different for other ids or another separator."""
    from tokenizers import Tokenizer, processors

    from megatron_lite.data import BPETokenizer
    ours = load_tokenizer(corpus_dir)
    copy = Tokenizer.from_str(ours.tok.to_str())
    copy.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert BPETokenizer(copy).identity == ours.identity
    copy.add_special_tokens(["<|sep|>"])
    assert BPETokenizer(copy, "<|sep|>").identity != BPETokenizer(copy).identity != ours.identity
    assert load_tokenizer(corpus_dir).describe() == ours.describe()
