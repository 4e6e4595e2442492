"""benchmarks/bench_gpu.py runs end to end on CPU (the tiny preset, eager, ours and nanoGPT) and writes
its JSON and its docs section; its real numbers come from a GPU (docs/benchmarks.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gpu_cpu_smoke(tmp_path):
    out, docs = tmp_path / "gpu.json", tmp_path / "benchmarks.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_COMMIT": "abc1234"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--cases",
                    "tiny", "--no-compile", "--steps", "1", "--warmup", "1", "--data-tokens", "20000",
                    "--out", str(out), "--docs", str(docs)], check=True, env=env, timeout=300)
    res = json.loads(out.read_text())
    assert res["commit"] == "abc1234"
    rows = {r["impl"]: r for r in res["runs"]}
    assert set(rows) == {"ours", "nanogpt"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["tokens_per_step"] == 128 * 4 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    text = docs.read_text()
    assert "<!-- begin gpu -->" in text and "| tiny | 128 x 4 | no |" in text and "failed" not in text
