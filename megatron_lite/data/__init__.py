from .dataset import Sampler, TokenStore
from .prepare import prepare
from .tokenizer import BPETokenizer, ByteTokenizer, DataError, check_same_tokenizer, load_tokenizer

__all__ = ["Sampler", "TokenStore", "prepare", "BPETokenizer", "ByteTokenizer", "DataError",
           "check_same_tokenizer", "load_tokenizer"]
