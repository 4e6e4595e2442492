"""Activation bytes per transformer layer against Korthikanti et al. (arXiv 2205.05198).

One block of a GPT in bf16 weights (no autocast) is run forward under saved_tensors_hooks on
rank 0 of t gloo ranks (megatron_lite/testing/activations.py: distinct storages of the saved
tensors, read after the forward, parameters excluded), for TP and TP+SP, each with no / selective
/ full recompute, t = 1, 2, 4. The formula (16-bit, flash attention, so without the 5as/h term):

    TP        sbh (10 + 24/t)    (norm inputs 4, qkv/fc1 inputs 4, dropout masks 2 replicated;
                                  q, k, v 6, proj input 2, gelu input 8, fc2 input 8 sharded)
    TP + SP   34 sbh / t
    full      2 sbh (2 sbh / t with SP): the layer input
Each row also lists model/activations.saved_terms, the same bytes term by term. Goal: measured /
formula <= 1.00 everywhere.

    python benchmarks/bench_activations.py [--hidden 512 --heads 8 --seq 256 --batch 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.model.activations import korthikanti_bytes, saved_terms  # noqa: E402
from megatron_lite.testing.activations import measure  # noqa: E402

MODES = ("none", "selective", "full")
SHORT = {  # saved_terms' names -> column headers
    "norm inputs (ln1, ln2)": "norm in", "norm statistics": "stats", "RMSNorm fp32 x/rms": "rms x",
    "norm outputs (qkv, fc1 inputs)": "qkv/fc1 in", "q, k, v (the fused qkv output)": "q,k,v",
    "attention output (proj input)": "proj in", "softmax log-sum-exp (fp32)": "lse",
    "fc1 output (activation input)": "fc1 out", "activation output (fc2 input)": "fc2 in",
    "silu(gate) (SwiGLU)": "silu", "dropout masks": "masks", "block input (kept by the checkpoint)": "input",
}


def run(name: str, mc: ModelConfig, a) -> list[dict]:
    rows = []
    sbh = a.seq * a.batch * mc.hidden_size
    for tp in (1, 2, 4):
        for sp in ((False,) if tp == 1 else (False, True)):
            measured = measure(mc, a.batch, a.seq, tp, sp, MODES)
            for mode in MODES:
                terms = saved_terms(mc, a.batch, a.seq, tp, sp, e=2, recompute=mode)
                formula = korthikanti_bytes(a.batch, a.seq, mc.hidden_size, tp, sp, mode)
                rows.append({"model": name, "tp": tp, "sp": sp, "recompute": mode, "bytes": measured[mode],
                             "terms_sum": sum(terms.values()), "formula": formula,
                             "ratio": measured[mode] / formula,
                             "terms_sbh": {k: v / sbh for k, v in terms.items() if v}})
                print(f"{name} t={tp} sp={sp} {mode:9s} {measured[mode] / sbh:7.3f} sbh  "
                      f"formula {formula / sbh:7.3f}  ratio {measured[mode] / formula:.3f}", flush=True)
    return rows


def section(rows, a) -> str:
    body = [
        "## Activation memory per layer vs Korthikanti et al. (`benchmarks/bench_activations.py`)",
        "",
        f"One block, bf16 weights (no autocast), s={a.seq}, b={a.batch}, h={a.hidden}, {a.heads} heads, "
        "residual dropout 0.1, attention dropout off (a flash kernel drops inside and keeps no mask). "
        "Bytes one tp rank keeps for backward, measured with `saved_tensors_hooks` (distinct storages, "
        "parameters excluded), over Korthikanti's 16-bit count without the 5as/h term: TP sbh(10 + 24/t), "
        "TP+SP 34sbh/t, the same under selective recompute, full recompute 2sbh (/t with SP). Terms in "
        "units of sbh (2 bytes per element of an (s, b, h) tensor = 2.0); `measured` equals their sum "
        "(model/activations.saved_terms; tests/dist/test_activation_memory.py asserts it). Dropout keeps "
        "its RNG state instead of a mask (Megatron: 1 byte each, 2sbh), selective recompute reruns the "
        "norms and the MLP activation, never a GEMM; the fp32 log-sum-exp and the norm statistics are "
        "terms the formula leaves out.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        cols = [k for k in SHORT if any(k in r["terms_sbh"] for r in mine)]
        body += [f"**{model}**", "",
                 "| t | SP | recompute | " + " | ".join(SHORT[c] for c in cols)
                 + " | measured (sbh) | formula (sbh) | measured / formula |",
                 "|---|---|---|" + "---|" * len(cols) + "---|---|---|"]
        sbh = a.seq * a.batch * a.hidden
        for r in mine:
            cells = [f"{r['terms_sbh'][c]:.3f}" if c in r["terms_sbh"] else "" for c in cols]
            head = f"| {r['tp']} | {'yes' if r['sp'] else 'no'} | {r['recompute']} | "
            tail = f" | {r['bytes'] / sbh:.3f} | {r['formula'] / sbh:.3f} | **{r['ratio']:.3f}** |"
            body.append(head + " | ".join(cells) + tail)
        body.append("")
    worst = max(r["ratio"] for r in rows if r["model"].startswith("GPT"))
    body.append(f"Largest GPT ratio: {worst:.3f}. The Llama-like rows (SwiGLU with I = 4h keeps "
                "fc1's 2I output and silu(gate); GQA's k, v are smaller; torch's composite RMSNorm keeps "
                "the fp32 upcast of its input and the fp32 normalised input) are not bound by the formula, "
                "which assumes a GELU MLP and LayerNorm; every term is listed.")
    return "\n".join(body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-llama", action="store_true", help="only the GPT (GELU, LayerNorm)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/activations.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    base = dict(vocab_size=128, hidden_size=a.hidden, num_layers=1, num_attention_heads=a.heads,
                max_sequence_length=a.seq, dropout=0.1)
    models = {"GPT (GELU 4h, LayerNorm, learned positions, MHA)": ModelConfig(**base)}
    if not a.no_llama:
        models["Llama-like (SwiGLU I = 4h, RMSNorm, RoPE, GQA with h/2 kv width)"] = ModelConfig(
            **base, activation="swiglu", norm="rmsnorm", position_embedding="rope", bias=False,
            num_kv_heads=a.heads // 2)
    rows = [r for name, mc in models.items() for r in run(name, mc, a)]
    write_json(a.out, {"shape": {"hidden": a.hidden, "heads": a.heads, "seq": a.seq, "batch": a.batch},
                       "torch": torch.__version__, "rows": rows})
    write_section(ROOT / "docs/benchmarks.md", "activations", section(rows, a))


if __name__ == "__main__":
    main()
