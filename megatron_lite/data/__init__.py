"""Data: tokenizers, preparation (prepare-data, whose sub-parser cli adds) and the token store
with its sampler. The store loads lazily (lazy.py): registering the sub-parser does not import torch."""

from ..lazy import lazy_names
from .prepare import prepare
from .tokenizer import BPETokenizer, ByteTokenizer, DataError, check_same_tokenizer, load_tokenizer

_WHERE = {"Sampler": "dataset", "TokenStore": "dataset", "BlendedSampler": "blend"}
__all__ = ["Sampler", "TokenStore", "BlendedSampler", "prepare", "BPETokenizer", "ByteTokenizer", "DataError",
           "check_same_tokenizer", "load_tokenizer"]
__getattr__ = lazy_names(__name__, _WHERE)
