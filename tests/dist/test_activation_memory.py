"""Activation bytes one block keeps for backward (bf16 weights, no autocast), measured through
saved_tensors_hooks: equal to model/activations.saved_terms term by term, and at most Korthikanti
et al.'s 16-bit flash-attention count (34sbh/t with SP, sbh(10 + 24/t) without) in every mode."""

import pytest
import torch

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


def test_tp2_sequence_parallel_moe_block_keeps_its_shards_routing():
    """Sequence-parallel MoE: the router, the routed rows and the experts' activations over the
    rank's own 1/tp of the tokens (saved_terms' moe_terms at the shard's token count)."""
    mc = gpt(**LLAMA, moe=dict(num_experts=4, top_k=2, intermediate_size=32, num_shared_experts=1,
                               aux_loss_coeff=0.01, z_loss_coeff=0.001))
    measured = measure(mc, B, S, 2, True)
    check(mc, 2, True, measured, bound=False)
    assert measured["none"] < measure(mc, B, S, 2, False)["none"]  # without SP: the whole sequence


# ---- model.norm_saves_output: each norm keeps its output, the storage the next GEMM keeps ----------
def drop_is_the_norm_inputs(kw, tp, sp):
    """With the option the block keeps exactly the norm-input terms less without recompute (the saved
    output is one storage with the qkv/fc1 input, which the hooks count once), the same under
    selective (the norms are rerun from their kept inputs) and full; saved_terms counts it."""
    off, on = gpt(**kw), gpt(norm_saves_output=True, **kw)
    before, after = measure(off, B, S, tp, sp), measure(on, B, S, tp, sp)
    check(on, tp, sp, after, bound=False)
    norm_inputs = saved_terms(off, B, S, tp, sp, e=2)["norm inputs (ln1, ln2)"]
    assert norm_inputs == 2 * (B * S // (tp if sp else 1)) * 64 * 2
    assert before["none"] - after["none"] == norm_inputs
    assert after["selective"] == before["selective"] and after["full"] == before["full"]


@pytest.mark.parametrize("kw", [LLAMA, dict()], ids=["rmsnorm", "layernorm"])
def test_output_saving_norms_drop_the_norm_inputs_serial(kw):
    drop_is_the_norm_inputs(kw, 1, False)


def test_output_saving_norms_drop_the_norm_inputs_tp2_sequence_parallel():
    """Under SP the saved output is the sequence shard gather_linear keeps."""
    drop_is_the_norm_inputs(LLAMA, 2, True)


def _train_parity(rank, world, data_dir, out):
    """Five fp32 AdamW steps (clipping engaged): the output-saving norms against the input-saving
    ones, serial (RMSNorm and LayerNorm; also under selective recompute, which reruns them) and at
    TP2 + SP, on the same batches."""
    from tests.dist.test_data_parallel import _config, _env, _run
    for norm in ("rmsnorm", "layernorm"):
        torch.manual_seed(0)
        common = (f"model.norm={norm}", "train.grad_accum=2")
        _, want = _run(_config(data_dir, f"{out}/off_{norm}{rank}", *common))  # serial, on each rank
        on = (*common, "model.norm_saves_output=true")
        runs = {"serial": _run(_config(data_dir, f"{out}/on_{norm}{rank}", *on))[1],
                "serial selective": _run(_config(data_dir, f"{out}/sel_{norm}{rank}", *on,
                                                 "train.recompute=selective"))[1]}
        tp = ("parallel.tp=2", "parallel.sequence_parallel=true")
        runs["tp2 sp"] = _run(_config(data_dir, f"{out}/tp_{norm}", *on, *tp), _env(rank, world))[1]
        assert all(n > 0.3 for _, n in want)
        for name, got in runs.items():
            flat = [v for step in got for v in step]  # loss, grad norm per step
            assert flat == pytest.approx([v for s in want for v in s], rel=1e-5), (norm, name, got, want)


def test_training_with_output_saving_norms_matches_input_saving_norms(corpus_dir, tmp_path):
    from megatron_lite.testing import run_ranks
    run_ranks(_train_parity, 2, str(corpus_dir), str(tmp_path))
