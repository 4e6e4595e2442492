"""benchmarks/bench_context.py's pieces: how a saved storage is classed (what must fall as 1/cp and
what is cp's own), the ratios to cp=1, the throughput summary (the slowest rank, the median), a real
cp=1 measurement in this process, and the docs section rendered from a result."""

import torch

from benchmarks import bench_context as bc
from megatron_lite.config import ModelConfig

T, CP = 64, 2


def test_classify_tells_cp_terms_from_per_token_activations():
    assert bc.classify((1, 1, 32, 64), T, CP, is_mask=True) == "mask"
    assert bc.classify((1, 1, T // CP, T), T, CP) == "mask_float"  # SDPA's float copy (B|1, 1, T/cp, T)
    assert bc.classify((1, 2, T, 16), T, CP) == "gathered_kv"  # (B, K, T, D): every rank's keys
    assert bc.classify((100, 32), T, CP, dw=(100, 32)) == "loss_dw"
    assert bc.classify((1, 2, T // CP, 16), T, CP, kv_copy=(1, 2, T // CP, 16)) == "ring_kv"
    assert bc.classify((1, 2, T // CP, 16), T, CP) == "per_token"  # a view of qkv, not a copy
    assert bc.classify((1, T // CP, 32), T, CP) == "per_token"
    # without cp a rank holds all T tokens: nothing the size of the sequence is cp's
    assert bc.classify((1, 2, T, 16), T, 1) == "per_token"
    assert bc.classify((1, 1, T, T), T, 1) == "per_token"


def _row(dtype, cp, per_token, other=0):
    b = dict.fromkeys(bc.CLASSES, 0)
    b.update(per_token=per_token, mask=other)
    return {"dtype": dtype, "cp": cp, "algorithm": "-" if cp == 1 else "ring", "bytes": b,
            "storages": dict.fromkeys(bc.CLASSES, 0), "total": per_token + other}


def test_ratios_are_to_the_same_dtypes_cp1_and_the_claim_is_within_ten_percent():
    rows = bc.with_ratios([_row("fp32", 1, 1000), _row("fp32", 2, 540, 100), _row("fp32", 4, 280, 50),
                           _row("bf16", 1, 500), _row("bf16", 2, 250)])
    f2, f4, b2 = rows[1], rows[2], rows[4]
    assert f2["per_token_scaled"] == 1.08 and f2["per_token_within"]
    assert abs(f2["total_scaled"] - 1.28) < 1e-12 and not f2["total_within"]  # the mask counts in the total
    assert abs(f4["per_token_scaled"] - 1.12) < 1e-12 and not f4["per_token_within"]
    assert b2["per_token_scaled"] == 1.0  # against bf16's cp=1, not fp32's


def test_throughput_takes_the_slowest_rank_and_the_median_round():
    def rank(scale):
        return {"seconds": {"cp1_dp2": [1.0 * scale, 1.1, 9.0], "cp2_allgather": [2.0, 2.0, 2.0],
                            "cp2_ring": [4.0, 4.0 * scale, 4.0]},
                "waits": {v: [{"p2p": 0.5}] * 3 if v == "cp2_ring" else [{}] * 3 for v in bc.VARIANTS}}
    out = bc.summarize_throughput([rank(1.0), rank(1.5)], tokens_per_step=100)
    assert out["cp1_dp2"]["seconds_per_step"] == [1.5, 1.1, 9.0]  # per round, the slower rank
    assert out["cp1_dp2"]["tokens_per_s"] == round(100 / 1.5, 1)  # median round: one outlier does not count
    assert out["cp2_allgather"]["ratio_to_cp1"] == 0.75
    assert out["cp2_ring"]["exposed_seconds_by_kind"] == [{"p2p": 0.5}, {"p2p": 0.5}]
    assert out["cp2_ring"]["exposed_share_per_rank"] == [0.125, 0.125]


def test_measure_rank_without_cp_keeps_per_token_activations_and_the_loss_dw():
    torch.set_num_threads(1)
    mc = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                     max_sequence_length=64, activation="swiglu", norm="rmsnorm", position_embedding="rope",
                     bias=False)
    r = bc.measure_rank(mc, 64, torch.float32)
    b = r["bytes"]
    assert r["tokens"] == 64 and r["total"] == sum(b.values())
    assert b["loss_dw"] == 96 * 32 * 4  # the fused loss's (V, C) gradient, saved by the forward
    assert b["per_token"] > 2 * 64 * 32 * 4 * 6  # at least the norm inputs, qkv and MLP of 2 layers
    assert b["mask"] == b["mask_float"] == b["gathered_kv"] == b["ring_kv"] == 0  # causal, no cp


def test_section_renders_both_parts():
    rows = bc.with_ratios([_row("fp32", 1, 2**20), _row("fp32", 2, 2**19, 2**18)])
    shape = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "vocab": 96}
    waits = [{"p2p": 0.1}, {"p2p": 0.2}]
    res = {v: {"tokens_per_s": 1000.0, "ratio_to_cp1": 1.0, "seconds_per_step": [1.0],
               "exposed_seconds_by_kind": waits, "exposed_share_per_rank": [0.1, 0.2]} for v in bc.VARIANTS}
    text = bc.section({
        "machine": "test CPU",
        "memory": {"shape": {**shape, "seq": 64, "batch": 1}, "rows": rows, "command": "`x`",
                   "commit": "abc"},
        "throughput": {"shape": {**shape, "seq": 64, "global_batch": 2, "rounds": 1, "steps": 1, "warmup": 1},
                       "results": res, "command": "`y`", "commit": "abc",
                       "load": {"before": 1.0, "during_min": 1.0, "during_max": 1.2, "max_load": 3.0,
                                "waited_s": 0, "load_ok": True}}})
    assert text.startswith("## Context parallelism")
    assert "| fp32 | 2 | ring | 0.50 |" in text and "**1.000** ✓" in text
    assert "p2p 0.100; p2p 0.200" in text and "and it did not" not in text
