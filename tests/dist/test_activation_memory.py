"""Activation bytes one block keeps for backward (bf16 weights, no autocast), measured through
saved_tensors_hooks: equal to model/activations.saved_terms term by term, and at most Korthikanti
et al.'s 16-bit flash-attention count (34sbh/t with SP, sbh(10 + 24/t) without) in every mode."""

import pytest

from megatron_lite.config import ModelConfig
from megatron_lite.model.activations import korthikanti_bytes, saved_terms
from megatron_lite.testing.activations import measure

B, S = 2, 32
MODES = ("none", "selective", "full")


def gpt(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=128, hidden_size=64, num_layers=1, num_attention_heads=4,
                       max_sequence_length=S, dropout=0.1, **kw)


def check(mc, tp, sp, measured, bound=True):
    for mode in MODES:
        terms = saved_terms(mc, B, S, tp, sp, e=2, recompute=mode)
        assert measured[mode] == sum(terms.values()), (mode, measured[mode], terms)
        if bound:
            assert measured[mode] <= korthikanti_bytes(B, S, mc.hidden_size, tp, sp, mode), mode
    # selective keeps less than none, full less than selective
    assert measured["full"] < measured["selective"] < measured["none"]


def test_serial_block_keeps_at_most_korthikanti():
    mc = gpt()
    check(mc, 1, False, measure(mc, B, S, 1, False))


LLAMA = dict(activation="swiglu", num_kv_heads=2, position_embedding="rope", norm="rmsnorm", bias=False)


@pytest.mark.parametrize("kw", [LLAMA, dict(activation="gelu_exact", position_embedding="rope")])
def test_llama_like_block_keeps_what_saved_terms_counts(kw):
    """SwiGLU (fc1's [gate | up], silu(gate) recomputed), GQA (smaller k, v), RoPE (rotated in place)
    and RMSNorm (its bf16 input and an fp32 1/rms per row): the terms differ from the formula's,
    and each is counted. With I = 4h SwiGLU's 2I-wide fc1 output is 8sbh more than GELU's, so
    the formula is no bound here."""
    mc = gpt(**kw)
    check(mc, 1, False, measure(mc, B, S, 1, False), bound=False)


def test_llama_block_at_llama3_mlp_width_keeps_at_most_korthikanti():
    """Llama 3 405B's MLP width (I = 53248 = 3.25h): SwiGLU keeps 2I + I = 9.75h per token against
    GELU's 4h + 4h, and the formula holds, with SP too."""
    mc = gpt(intermediate_size=64 * 13 // 4, **LLAMA)
    check(mc, 1, False, measure(mc, B, S, 1, False))
    check(mc, 2, True, measure(mc, B, S, 2, True))


def test_tp2_sequence_parallel_block_keeps_a_shard_of_everything():
    """The QKV and FC1 inputs are kept as sequence shards and re-gathered in backward."""
    mc = gpt()
    check(mc, 2, True, measure(mc, B, S, 2, True))
