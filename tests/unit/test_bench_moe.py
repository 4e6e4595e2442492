"""benchmarks/bench_moe.py's arithmetic and report, without running it (the runs are the benchmark's)."""

import json
from pathlib import Path

from benchmarks.bench_moe import analytic_bytes, section

ROOT = Path(__file__).resolve().parents[2]


def test_analytic_all_to_all_volume():
    """Per MoE layer and micro-batch: dispatch + combine, forward + backward, of N x top_k rows of C
    fp32 values, plus the E int64 counts of the forward."""
    assert analytic_bytes(moe_layers=4, micro_batches=1, tokens=1024, top_k=2, hidden=128, experts=8) == \
        4 * (4 * 2048 * 128 * 4 + 8 * 8)


def test_the_recorded_results_render_their_section():
    """The committed JSON renders the docs section it wrote (ratios, the exact all-to-all volume)."""
    result = json.loads((ROOT / "benchmarks/results/moe.json").read_text())
    text = section(result)
    assert abs(result["dispatch"]["group_bytes_over_analytic"] - 1.0) < 1e-9
    assert "ep2 / ep1 tokens/s" in text and "Load balance" in text and "Convergence" in text
    assert text.strip() in (ROOT / "docs/benchmarks.md").read_text()
