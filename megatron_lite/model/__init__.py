from .gpt import GPT, KVCache, generate
from .init import init_weights, master_init

__all__ = ["GPT", "KVCache", "generate", "init_weights", "master_init"]
