"""A plan as a table for the terminal and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .cluster import GB
from .search import PlanResult
from .timing import GEMM_EFFICIENCY


def override_args(overrides: dict) -> str:
    """The dotted overrides as command-line words (YAML values: true/false, numbers, names)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()
                    if k != "train.grad_accum")


def format_table(result: PlanResult, top: int = 10, config_name: str = "C") -> str:
    c = result.cluster
    lines = [f"{c.nodes} x {c.gpus_per_node} {c.name} ({c.gpu_memory_gb:g} GB, {c.peak_tflops:g} TFLOP/s) | "
             f"model {result.model_params / 1e9:.3g}B params | global batch {result.global_batch} x "
             f"{result.seq} tokens | time model: {result.profile}",
             f"{result.considered} layouts tried: {sum(result.rejected.values())} refused by Layout, "
             f"{len(result.too_big)} do not fit memory, {len(result.ranked)} ranked"]
    if result.rejected:
        why, n = result.rejected.most_common(1)[0]
        lines.append(f"most refused: {why} ({n}x)")
    if not result.ranked:
        lines.append("no layout fits: add nodes, lower the micro-batch, or allow recompute / ZeRO.")
        if result.too_big:
            best = result.too_big[0]
            lines.append(f"smallest: {best.describe()} needs {best.memory.total / GB:.1f} GB per rank.")
        return "\n".join(lines)
    head = ["#", "layout", "mem/rank GB", "step s", "tokens/s", "TFLOP/s/GPU", "MFU", "comm", "bubble"]
    rows = []
    for i, cand in enumerate(result.ranked[:top], 1):
        t = cand.timing
        rows.append([str(i), cand.describe(), f"{cand.memory.total / GB:.1f}", f"{t.step_s:.3g}",
                     f"{t.tokens_per_s:,.0f}", f"{t.tflops_per_gpu:.0f}", f"{100 * t.mfu:.1f}%",
                     f"{100 * t.comm_share:.1f}%", f"{100 * t.bubble:.1f}%"])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 1 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths,
                                                                                                 strict=True)))
    lines += ["", fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    best = result.ranked[0].timing
    shown = ", ".join(f"{k} {v:.3g} s" for k, v in best.exposed.items() if v)
    lines += ["", f"#1 exposed communication per step: {shown or 'none'}; overlapped behind compute: "
                  f"{', '.join(best.overlapped) or 'nothing'}"
                  + (f" ({best.dp_hidden_s:.3g} s of dp collectives hidden)" if best.overlapped else "")]
    lines += ["", f"train #1: megatron-lite launch torchrun --config {config_name} "
                  f"{override_args(result.ranked[0].overrides)}"]
    return "\n".join(lines)


def write_json(result: PlanResult, path: str | Path) -> None:
    out = {"cluster": asdict(result.cluster), "model_params": result.model_params,
           "global_batch": result.global_batch, "seq": result.seq, "considered": result.considered,
           "rejected": dict(result.rejected), "gemm_efficiency": GEMM_EFFICIENCY,
           "profile": result.profile,
           "ranked": [c.as_dict() for c in result.ranked],
           "too_big": [c.as_dict() for c in result.too_big[:20]]}
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
