"""Tokenizers through the CLI: prepare-data refuses one that cannot encode text or has no document
separator (one sentence, nothing written); a Llama-3-style tokenizer (no <|endoftext|>) is prepared
with its eos token, or the token --separator names, and the choice travels with it; resuming a
checkpoint on tokens of another tokenizer (same vocabulary size, other ids) is refused."""

import json
from pathlib import Path

import pytest

from megatron_lite.checkpoint import CheckpointManager
from megatron_lite.data import BPETokenizer, TokenStore, load_tokenizer
from megatron_lite.data.tokenizer import EOT
from tests.conftest import ROOT, cli, tiny_overrides

BOT, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def llama3_tokenizer(vocab_size: int):
    """A Llama-3-style tokenizer built offline: a byte-level BPE whose only special tokens are
    <|begin_of_text|> and <|end_of_text|> (no <|endoftext|>), trained on this package's sources to
    exactly `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOT, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted((ROOT / "megatron_lite").rglob("*.py"))], trainer)
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(EOT) is None
    return tok


def load_tokenizer_file(path: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


def refused(r, *needles: str) -> str:
    """A user error: exit status 2, one `error: ` line naming `needles`, no traceback, nothing else."""
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr
    return r.stderr


def _sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    # The package's own data code as text, minus any literal special token (the tokenizer would
    # encode one in the text as that token, and the tests count separators).
    for i, p in enumerate(sorted((ROOT / "megatron_lite" / "data").glob("*.py"))):
        text = p.read_text()
        for special in ("<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>"):
            text = text.replace(special, "")
        (src / f"doc{i}.txt").write_text(text)
    return src


def _tokenizer_file(tmp_path: Path, kind: str) -> Path:
    from tokenizers import Tokenizer, models
    tok = {"empty": lambda: Tokenizer(models.BPE()),  # what transformers builds for a directory without one
           "unknown": lambda: Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
           "llama3": lambda: llama3_tokenizer(300)}[kind]()
    if kind != "llama3":
        tok.add_special_tokens([EOT])
    (tmp_path / kind).mkdir()
    tok.save(str(tmp_path / kind / "tokenizer.json"))
    return tmp_path / kind / "tokenizer.json"


@pytest.mark.parametrize("kind, args, needles", [
    ("empty", [], ["cannot encode text", "becomes nothing", "holds 1 tokens"]),
    ("unknown", [], ["cannot encode text", "becomes unknown tokens only"]),
    ("llama3", [], ["names no eos or bos token", f"'{BOT}', '{EOS}'", "--separator"]),
    ("llama3", ["--separator", "<|eot_id|>"], ["has no '<|eot_id|>' token", f"'{BOT}', '{EOS}'"]),
    ("llama3", ["--separator", "eos"], ["--separator eos", "names no eos token"]),
    ("bytes", ["--separator", EOS], [f"--separator '{EOS}' applies to a loaded tokenizer"]),
])
def test_prepare_refuses_a_tokenizer_it_cannot_use(kind, args, needles, tmp_path):
    tokenizer = "bytes" if kind == "bytes" else str(_tokenizer_file(tmp_path, kind))
    src, out = _sources(tmp_path), tmp_path / "out"
    r = cli("prepare-data", "--source", str(src), "--out", str(out), "--tokenizer", tokenizer, *args)
    refused(r, *needles)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_llama3_tokenizer_separates_documents_with_its_eos_token(tmp_path):
    tokenizer, src = _tokenizer_file(tmp_path, "llama3"), _sources(tmp_path)
    eos, bos = (load_tokenizer_file(tokenizer).token_to_id(t) for t in (EOS, BOT))

    def prepare(out: str, tokenizer: Path, *args: str) -> tuple[str, TokenStore]:
        r = cli("prepare-data", "--source", str(src), "--out", str(tmp_path / out), "--tokenizer",
                str(tokenizer), *args)
        assert r.returncode == 0, r.stderr
        return r.stdout, TokenStore(tmp_path / out)

    # Named by --separator, or found beside the tokenizer (an HF tokenizer_config.json).
    log, store = prepare("named", tokenizer, "--separator", EOS)
    assert f"document separator: '{EOS}' (id {eos}; named by --separator)" in log
    (tokenizer.parent / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOT, "eos_token": EOS}))
    log, beside = prepare("beside", tokenizer.parent)
    assert f"'{EOS}' (id {eos}; its eos token)" in log
    assert beside.eot_id == eos and load_tokenizer(beside.dir).separator == EOS
    for store_ in (store, beside):
        tokens, starts = store_.split("train"), store_.documents("train")
        assert all(tokens[s - 1] == eos for s in [*starts[1:], len(tokens)])  # every document ends with it
        assert (tokens == eos).sum() == len(starts)
    # The prepared directory records it: its tokenizer.json prepares the same way without a flag.
    again = BPETokenizer.from_file(beside.dir / "tokenizer.json")
    assert (again.separator, again.why) == (EOS, "recorded with the tokenizer")
    bos_first = BPETokenizer.from_file(tokenizer, "bos")
    assert (bos_first.separator, bos_first.eot_id) == (BOT, bos)


@pytest.mark.slow
def test_resuming_on_another_tokenizers_tokens_is_refused(corpus_dir, tmp_path):
    run = tmp_path / "run"

    def train(data: Path, steps: int):
        return cli("train", "--config", "configs/tiny.yaml", *tiny_overrides(data, f"train.out_dir={run}"),
                   f"train.steps={steps}", "optim.warmup_steps=1")
    assert train(corpus_dir, 2).returncode == 0
    step2 = CheckpointManager(run / "checkpoints").latest()
    # Another BPE of the same size (trained on other text): the same vocab_size, other ids.
    other = tmp_path / "other"
    assert cli("prepare-data", "--source", "stdlib", "--max-bytes", "150000", "--vocab-size", "512", "--out",
               str(other)).returncode == 0
    ours, theirs = (load_tokenizer(d) for d in (other, corpus_dir))
    assert ours.vocab_size == theirs.vocab_size == 512 and ours.identity != theirs.identity
    refused(train(other, 4), f"data.dir '{other}' was tokenized by a tokenizer of 512 tokens", ours.identity,
            f"checkpoint '{step2}' was trained on", theirs.identity,
            f"prepare-data --tokenizer {step2 / 'tokenizer.json'}`")
    assert CheckpointManager(run / "checkpoints").latest() == step2  # nothing written
    # The fix it names: the same sources prepared with the checkpoint's tokenizer resume.
    fixed = tmp_path / "fixed"
    assert cli("prepare-data", "--source", "stdlib", "--max-bytes", "150000", "--tokenizer",
               str(step2 / "tokenizer.json"), "--out", str(fixed)).returncode == 0
    r = train(fixed, 4)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
