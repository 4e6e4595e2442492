"""Tokenizers: an HF `tokenizers` byte-level BPE (trained here or loaded from tokenizer.json) or
raw bytes. Both reserve one end-of-text id that separates documents in the token stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataError

EOT = "<|endoftext|>"


class ByteTokenizer:
    """Raw UTF-8 bytes: ids 0..255, end-of-text = 256."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> dict:
        return {"type": "bytes"}


class BPETokenizer:
    """HF `tokenizers` byte-level BPE (GPT-2 style): lossless on any UTF-8 text."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise DataError(f"tokenizer has no {EOT!r} token; train one with prepare-data or add "
                            f"that special token to it.")
        self.eot_id = eot
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on unreadable files
            raise DataError(f"cannot read tokenizer file {str(path)!r} ({' '.join(str(e).split())}); "
                            f"point to a tokenizer.json saved by HF tokenizers.") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: Path) -> dict:
        self.tok.save(str(Path(directory) / "tokenizer.json"))
        return {"type": "bpe", "file": "tokenizer.json"}


Tokenizer = ByteTokenizer | BPETokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer recorded in a prepared data (or checkpoint) directory's meta.json."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{str(directory)!r} holds no meta.json; run `megatron-lite prepare-data "
                        f"--out {directory}` first.")
    try:
        spec = json.loads(meta_path.read_text())["tokenizer"]
        kind, file = spec["type"], spec.get("file")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{str(meta_path)!r} is corrupt (no tokenizer entry); prepare the data again "
                        f"with `megatron-lite prepare-data --force`.") from None
    if kind == "bytes":
        return ByteTokenizer()
    return BPETokenizer.from_file(directory / str(file))
