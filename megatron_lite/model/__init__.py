from .gpt import GPT, Documents, KVCache, generate
from .init import init_weights, master_init

__all__ = ["GPT", "Documents", "KVCache", "generate", "init_weights", "master_init"]
