"""Activation bytes per transformer layer against Korthikanti et al. (arXiv 2205.05198).

One block of a GPT in bf16 weights (no autocast) is run forward under saved_tensors_hooks on
rank 0 of t gloo ranks (megatron_lite/testing/activations.py: distinct storages of the saved
tensors, read after the forward, parameters excluded), for TP and TP+SP, each with no / selective
/ full recompute, t = 1, 2, 4. The formula (16-bit, flash attention, so without the 5as/h term):

    TP        sbh (10 + 24/t)    (norm inputs 4, qkv/fc1 inputs 4, dropout masks 2 replicated;
                                  q, k, v 6, proj input 2, gelu input 8, fc2 input 8 sharded)
    TP + SP   34 sbh / t
    full      2 sbh (2 sbh / t with SP): the layer input
Each row also lists model/activations.saved_terms, the same bytes term by term. Models: the GPT
(GELU, LayerNorm), a Llama-like block (SwiGLU, RMSNorm, RoPE, GQA) with I = 4h and the same at
Llama 3 405B's MLP width I = 3.25h; the GPT and the 405B-width block again with
model.norm_saves_output (each norm keeps its output, the qkv/fc1 input, instead of its input) at t=1
and t=4 with SP. Goal: measured / formula <= 1.00 everywhere, except where the model is wider than
the formula's (SwiGLU at I = 4h), which the reading paragraph accounts for.

    python benchmarks/bench_activations.py [--hidden 512 --heads 8 --seq 256 --batch 2]
    python benchmarks/bench_activations.py --add-norm-saves-output   # only those rows, added to --out's
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
LLAMA_4H = "Llama-like (SwiGLU I = 4h, RMSNorm, RoPE, GQA with h/2 kv width)"
LLAMA_405B_MLP = "Llama-like at 405B's MLP width (SwiGLU I = 3.25h, RMSNorm, RoPE, GQA with h/2 kv width)"
LAYOUTS = ((1, False), (2, False), (2, True), (4, False), (4, True))  # (t, SP)
NSO_LAYOUTS = ((1, False), (4, True))  # the rows with model.norm_saves_output


def nso_name(name: str) -> str:
    """The model's name with model.norm_saves_output on: 'GPT (...)' -> 'GPT, norm_saves_output (...)'."""
    short, rest = name.split(" (", 1)
    return f"{short}, norm_saves_output ({rest}"
SHORT = {  # saved_terms' names -> column headers
    "norm inputs (ln1, ln2)": "norm in", "norm statistics": "stats",
    "norm outputs (qkv, fc1 inputs)": "qkv/fc1 in", "q, k, v (the fused qkv output)": "q,k,v",
    "attention output (proj input)": "proj in", "softmax log-sum-exp (fp32)": "lse",
    "fc1 output (activation input)": "fc1 out", "activation output (fc2 input)": "fc2 in",
    "dropout masks": "masks", "block input (kept by the checkpoint)": "input",
}


def run(name: str, mc: ModelConfig, a, layouts=LAYOUTS) -> list[dict]:
    rows = []
    sbh = a.seq * a.batch * mc.hidden_size
    for tp, sp in layouts:
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
    names = list(dict.fromkeys(r["model"] for r in rows))
    worst = {m: max(r["ratio"] for r in rows if r["model"] == m) for m in names}
    body.append("Largest ratio: " + ", ".join(f"{m.split(' (')[0]} {w:.3f}" for m, w in worst.items()) + ".")
    wide = [r for r in rows if r["model"] == LLAMA_4H and r["tp"] == 1 and r["recompute"] == "none"]
    if wide:  # what keeps SwiGLU at I = 4h above the formula, term by term (t=1, no recompute)
        r = wide[0]
        t = r["terms_sbh"]
        fc1, qkv = t["fc1 output (activation input)"], t["q, k, v (the fused qkv output)"]
        small = t["norm statistics"] + t["softmax log-sum-exp (fp32)"]
        total = r["bytes"] / sbh
        tp_only = ", ".join(f"{q['ratio']:.3f} at t={q['tp']}" for q in rows if q["model"] == LLAMA_4H
                            and q["tp"] > 1 and not q["sp"] and q["recompute"] == "none")
        body += ["", (
            "RMSNorm keeps its input in bf16 and one fp32 1/rms per row (model/gpt.py `RMSNorm`: 2 bytes "
            "per element, where autograd through torch's composite rms_norm kept the fp32 upcast and the "
            "fp32 x/rms, 8), and SwiGLU keeps fc1's [gate | up] only, recomputing silu(gate) in backward "
            "(with torch's RMSNorm and F.silu(gate) * up the I = 4h block kept 20sbh more at t=1, 58.078sbh, "
            "ratio 1.708: the fp32 upcasts 4 over the bf16 inputs, the fp32 x/rms 8, silu(gate) 8). "
            "What remains above the formula in the I = 4h rows is SwiGLU's width: fc1's output is 2I = 8h "
            f"wide, {fc1:.3f}sbh where GELU's is 8 (fc2's input, I wide, is the same 8). The GQA k, v at "
            f"h/2 give back {6 - qkv:.3f}sbh (q,k,v {qkv:.3f} against 6), the replayed dropout masks 2, and "
            f"the fp32 norm statistics and log-sum-exp add {small:.3f}: 34 + {fc1 - 8:.3f} - {6 - qkv:.3f} "
            f"- 2 + {small:.3f} = {total:.3f}sbh at t=1, ratio {r['ratio']:.3f}; the same with SP (every "
            "term / t). Without SP the excess sits in a sharded term and the masks' 2sbh in a replicated "
            f"one: {tp_only}. Llama sizes its SwiGLU "
            "MLP near GELU's parameter count instead (I of about 8h/3; Llama 3 405B 53248 = 3.25h): at "
            "3.25h fc1's output is 13sbh and fc2's input 6.5, and those rows keep at most the formula in "
            "every mode.")]
    nso = [r for r in rows if ", norm_saves_output (" in r["model"] and r["recompute"] == "none"]
    if nso:  # the option against the same model without it, per layout (no recompute)
        def base(r):
            return next(q for q in rows if q["model"] == r["model"].replace(", norm_saves_output", "")
                        and (q["tp"], q["sp"], q["recompute"]) == (r["tp"], r["sp"], "none"))
        unit = a.seq * a.batch * a.hidden  # sbh
        cells = "; ".join(
            f"{r['model'].split(',')[0]} t={r['tp']}{' SP' if r['sp'] else ''} {base(r)['bytes'] / unit:.3f} "
            f"-> {r['bytes'] / unit:.3f}sbh (ratio {base(r)['ratio']:.3f} -> {r['ratio']:.3f})" for r in nso)
        from megatron_lite.config import Config
        mc = Config.from_yaml(ROOT / "configs/llama3-405b.yaml").model
        big = {on: sum(saved_terms(dataclasses.replace(mc, norm_saves_output=on), 1, 8192, 8, True, e=2,
                                   device="cuda").values()) for on in (False, True)}
        k405 = korthikanti_bytes(1, 8192, mc.hidden_size, 8, True)
        body += ["", (
            "`model.norm_saves_output` (the `, norm_saves_output` tables; Megatron/Apex's memory-efficient "
            "norm, model/gpt.py): each norm keeps its output y and one fp32 1/std per row instead of its "
            "input. y is the qkv / fc1 input, which that GEMM keeps anyway (under SP the shard "
            "gather_linear keeps): one storage, counted once, so the norm-input column (4sbh, 4sbh/t with "
            "SP) goes and nothing comes in its place; backward recovers x_hat = (y - b) / w, |w| clamped to "
            f">= eps (a zero weight's channel gets an approximate gradient, as in Apex). No recompute: "
            f"{cells}. "
            "Selective recompute keeps the norm inputs anyway (it reruns the norms from them) and full keeps "
            "the block input, so those rows are the same as without the option. At Llama 3 405B's shape "
            "(TP8 + SP, s=8192, b=1, model/activations.saved_terms) a block keeps "
            f"{big[False] / 2**20:.1f} -> {big[True] / 2**20:.1f} MiB ({big[False] / k405:.3f} -> "
            f"{big[True] / k405:.3f} of 34sbh/t); configs/llama3-405b.yaml turns it on.")]
    return "\n".join(body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-llama", action="store_true", help="only the GPT (GELU, LayerNorm)")
    p.add_argument("--add-norm-saves-output", action="store_true",
                   help="measure only the model.norm_saves_output rows and put them beside --out's rows "
                        "(same shape), rewriting the JSON and the docs section")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/activations.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    base = dict(vocab_size=128, hidden_size=a.hidden, num_layers=1, num_attention_heads=a.heads,
                max_sequence_length=a.seq, dropout=0.1)
    models = {"GPT (GELU 4h, LayerNorm, learned positions, MHA)": ModelConfig(**base)}
    if not a.no_llama:
        llama = dict(base, activation="swiglu", norm="rmsnorm", position_embedding="rope", bias=False,
                     num_kv_heads=a.heads // 2)
        models[LLAMA_4H] = ModelConfig(**llama)
        # Llama 3 405B's MLP width ratio, 53248 / 16384
        models[LLAMA_405B_MLP] = ModelConfig(**llama, intermediate_size=a.hidden * 13 // 4)
    nso = {nso_name(n): dataclasses.replace(mc, norm_saves_output=True) for n, mc in models.items()
           if n != LLAMA_4H}
    shape = {"hidden": a.hidden, "heads": a.heads, "seq": a.seq, "batch": a.batch}
    if a.add_norm_saves_output:
        old = json.loads(Path(a.out).read_text())
        if old["shape"] != shape:
            raise SystemExit(f"{a.out} holds shape {old['shape']}, not {shape}; run without "
                             f"--add-norm-saves-output")
        rows = [r for r in old["rows"] if r["model"] not in nso]
    else:
        rows = [r for name, mc in models.items() for r in run(name, mc, a)]
    rows += [r for name, mc in nso.items() for r in run(name, mc, a, NSO_LAYOUTS)]
    write_json(a.out, {"shape": shape, "torch": torch.__version__, "rows": rows})
    write_section(ROOT / "docs/benchmarks.md", "activations", section(rows, a))


if __name__ == "__main__":
    main()
