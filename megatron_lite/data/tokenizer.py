"""Tokenizers: an HF `tokenizers` byte-level BPE (trained here or loaded from tokenizer.json) or
raw bytes. Each has one separator token that ends every document in the token stream: `<|endoftext|>`
for the ones made here; for a loaded one, the token `--separator` names, else the one recorded beside
it, else its end-of-sequence token, else its beginning-of-sequence token, else `<|endoftext|>` (a
Llama tokenizer has no `<|endoftext|>`). The choice is recorded in meta.json next to tokenizer.json,
so training, generate, export and resume all use the same one."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
# Plain text every usable tokenizer turns into known tokens (one holding only special tokens, or only
# an unknown token for the words, turns it into nothing or into unknowns).
PROBE = "The quick brown fox jumps over the lazy dog, 0123456789."
# What decides the ids of a text (tokenizer.json's other parts only decode, pad or add special tokens,
# which data preparation never asks for; transformers rewrites its post_processor on load).
IDENTITY_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model")


class ByteTokenizer:
    """Raw UTF-8 bytes: ids 0..255, end-of-text = 256."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256
    separator = EOT
    identity = "bytes"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: list[str], dtype) -> list:
        """One array of `dtype` per text: its ids followed by the separator (what prepare-data stores)."""
        import numpy as np
        out = []
        for t in texts:
            raw = t.encode("utf-8")
            a = np.empty(len(raw) + 1, dtype=dtype)
            a[:-1] = np.frombuffer(raw, dtype=np.uint8)
            a[-1] = self.eot_id
            out.append(a)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> dict:
        return {"type": "bytes"}

    def describe(self) -> str:
        return "the bytes tokenizer"


class BPETokenizer:
    """An HF `tokenizers` tokenizer (byte-level BPE, GPT-2 style, when trained here), whose `separator`
    ends every document. Refused when it lacks that token or cannot encode plain text."""

    kind = "bpe"

    def __init__(self, tok, separator: str = EOT, where: str = "the tokenizer", why: str = "recorded"):
        self.tok = tok
        self.separator = separator
        self.why = why  # how the separator was chosen (for the log line of prepare-data and import)
        eot = tok.token_to_id(separator)
        if eot is None:
            raise DataError(f"{where} has no {separator!r} token to separate documents; pass --separator "
                            f"naming one of its special tokens ({_some(special_tokens(tok))}).")
        self.eot_id = eot
        self.vocab_size = tok.get_vocab_size()
        _check_encodes(tok, where)

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
    def choosing(cls, tok, wanted: str | None, named: dict, where: str) -> "BPETokenizer":
        """`tok` with the separator `choose_separator` picks."""
        token, why = choose_separator(tok, wanted, named, where)
        return cls(tok, token, where, why)

    @classmethod
    def from_file(cls, path: str | Path, separator: str | None = None) -> "BPETokenizer":
        """A user's tokenizer.json, its separator chosen from `separator` and the files beside it."""
        return cls.choosing(_read_file(path), separator, specials_beside(Path(path).parent),
                            f"tokenizer file {str(path)!r}")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: list[str], dtype) -> list:
        """One array of `dtype` per text: its ids followed by the separator (what prepare-data stores).
        encode_batch, not encode per text: measured ~25-35% less CPU per byte, even on one thread."""
        import numpy as np
        out = []
        for e in self.tok.encode_batch(texts, add_special_tokens=False):
            ids = e.ids
            a = np.empty(len(ids) + 1, dtype=dtype)
            a[:-1] = ids
            a[-1] = self.eot_id
            out.append(a)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: Path) -> dict:
        self.tok.save(str(Path(directory) / "tokenizer.json"))
        return {"type": "bpe", "file": "tokenizer.json", "separator": self.separator}

    @property
    def identity(self) -> str:
        """A short hash of what decides the token ids of a text, and of the separator: two tokenizers
        with one identity turn any corpus into the same token stream."""
        spec = json.loads(self.tok.to_str())
        core = {**{k: spec.get(k) for k in IDENTITY_KEYS}, "separator": self.separator}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:12]

    def log_separator(self) -> None:
        log.info(f"document separator: {self.separator!r} (id {self.eot_id}; {self.why})")

    def describe(self) -> str:
        return (f"a tokenizer of {self.vocab_size} tokens separated by {self.separator!r} (identity "
                f"{self.identity})")


Tokenizer = ByteTokenizer | BPETokenizer


def special_tokens(tok) -> list[str]:
    return [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.special]


def choose_separator(tok, wanted: str | None, named: dict, where: str) -> tuple[str, str]:
    """The separator token and why it was chosen: `wanted` (a token, or 'eos' / 'bos' for the one
    `named` gives), else named['recorded'] (what meta.json beside the tokenizer says), else its eos,
    else its bos, else <|endoftext|>."""
    if wanted in ("eos", "bos"):
        if not named.get(wanted):
            raise DataError(f"--separator {wanted}: {where} names no {wanted} token (no "
                            f"tokenizer_config.json beside it says one); pass --separator with one of its "
                            f"special tokens ({_some(special_tokens(tok))}).")
        return named[wanted], f"its {wanted} token, as --separator {wanted} asked"
    if wanted:
        return wanted, "named by --separator"
    for key, why in (("recorded", "recorded with the tokenizer"), ("eos", "its eos token"),
                     ("bos", "its bos token (it names no eos token)")):
        if named.get(key):
            return named[key], why
    if tok.token_to_id(EOT) is not None:
        return EOT, "it names no eos or bos token"
    raise DataError(f"{where} names no eos or bos token and has no {EOT!r} to separate documents; pass "
                    f"--separator naming one of its special tokens ({_some(special_tokens(tok))}).")


def specials_beside(directory: Path) -> dict:
    """The separator our meta.json records for the tokenizer.json in `directory`, and the eos / bos
    tokens an HF tokenizer_config.json (or special_tokens_map.json) there names."""
    named = {}
    spec = _json(directory / "meta.json").get("tokenizer")
    if isinstance(spec, dict) and spec.get("type") == "bpe":  # written before separators: <|endoftext|>
        named["recorded"] = spec.get("separator", EOT)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        config = _json(directory / name)
        for key in ("eos", "bos"):
            token = config.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and token:
                named[key] = token
    return named


def _json(path: Path) -> dict:
    """A JSON object from `path`, or {} when there is none (these files are optional hints)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _check_encodes(tok, where: str) -> None:
    """Refuse a tokenizer that cannot encode text: it would turn every document into nothing (an HF
    directory without tokenizer files loads as one holding only <|endoftext|>) or into unknowns."""
    ids = tok.encode(PROBE, add_special_tokens=False).ids
    if ids and not set(ids) <= _unknown_ids(tok):
        return
    got = "nothing" if not ids else "unknown tokens only"
    raise DataError(f"{where} cannot encode text ({PROBE!r} becomes {got}; it holds "
                    f"{tok.get_vocab_size()} tokens); pass the model's complete tokenizer.json.")


def _unknown_ids(tok) -> set[int]:
    model = json.loads(tok.to_str()).get("model") or {}
    unk_id, unk_token = model.get("unk_id"), model.get("unk_token")
    found = tok.token_to_id(unk_token) if isinstance(unk_token, str) else None
    return {i for i in (unk_id, found) if isinstance(i, int)}


def _some(names: list[str], limit: int = 8) -> str:
    if not names:
        return "it has none"
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _read_file(path: str | Path):
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on unreadable files
        raise DataError(f"cannot read tokenizer file {str(path)!r} ({' '.join(str(e).split())}); "
                        f"point to a tokenizer.json saved by HF tokenizers.") from None


def _spec(directory: Path) -> dict:
    """The tokenizer entry of a prepared data (or checkpoint) directory's meta.json."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{str(directory)!r} holds no meta.json; run `megatron-lite prepare-data "
                        f"--out {directory}` first.")
    try:
        spec = json.loads(meta_path.read_text())["tokenizer"]
        spec["type"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{str(meta_path)!r} is corrupt (no tokenizer entry); prepare the data again "
                        f"with `megatron-lite prepare-data --force`.") from None
    return spec


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer recorded in a prepared data (or checkpoint) directory's meta.json."""
    directory = Path(directory)
    spec = _spec(directory)
    if spec["type"] == "bytes":
        return ByteTokenizer()
    path = directory / str(spec.get("file"))
    return BPETokenizer(_read_file(path), str(spec.get("separator", EOT)), f"tokenizer file {str(path)!r}")


def tokenizer_identity(directory: str | Path) -> str | None:
    """What a directory's tokens were made with ("the bytes tokenizer", "a tokenizer of N tokens
    separated by S (identity H)"), or None when it records none; equal strings, equal token streams."""
    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        return None
    spec = _spec(directory)
    if spec["type"] in ("bytes", "bpe"):
        return load_tokenizer(directory).describe()
    # Another writer's tokens (e.g. verify's random ones): its whole entry is its identity.
    return f"the {spec['type']!r} tokenizer {json.dumps(spec, sort_keys=True)}"


def check_same_tokenizer(data_dir: str | Path, checkpoint: Path) -> None:
    """Resuming on tokens from another tokenizer trains on silently wrong ids: refuse it."""
    theirs = tokenizer_identity(checkpoint)
    ours = tokenizer_identity(data_dir) if theirs is not None else None
    if ours == theirs:
        return
    fix = str(checkpoint / "tokenizer.json") if (checkpoint / "tokenizer.json").is_file() else "bytes"
    raise DataError(f"data.dir {str(data_dir)!r} was tokenized by {ours}, but checkpoint {str(checkpoint)!r} "
                    f"was trained on {theirs}; prepare data.dir with `megatron-lite prepare-data "
                    f"--tokenizer {fix}`, or choose a new train.out_dir.")
