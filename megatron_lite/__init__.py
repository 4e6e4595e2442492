"""megatron_lite: Megatron-style parallel GPT training with nanoGPT's readability."""

__version__ = "0.1.0"
