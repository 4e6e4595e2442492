"""The planner's memory model against the peak memory of real training processes (CPU, gloo).

benchmarks/plan_memory_probe.py runs the real Trainer on every rank and reports the peak RSS over
the RSS just before the model is built (interpreter, torch and its lazily loaded code, the gloo
group, the data: the process baseline, subtracted). It runs with MALLOC_MMAP_THRESHOLD_=65536 so
glibc returns every freed tensor of 64 KiB or more at once: RSS then follows the live tensors, which
is what plan.memory_of predicts (with glibc's defaults the heap keeps freed activations; that
retention is measured in benchmarks/bench_plan.py, not predicted). The model is small but its state
(weights, grads, AdamW: ~470 MB) plus activations (~300 MB) dominate the ~320 MB baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite import plan
from megatron_lite.config import Config
from megatron_lite.layout import Layout

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MODEL = ["model.vocab_size=8192", "model.hidden_size=512", "model.num_layers=8",
         "model.num_attention_heads=8", "model.max_sequence_length=256", "data.micro_batch_size=4",
         "parallel.microbatches=2",
         "train.device=cpu", "train.progress=false", "train.sample_tokens=0", "optim.warmup_steps=1",
         "train.eval_iters=2", "log.tensorboard=false"]


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["parallel.tp=2"]), (2, ["parallel.pp=2"])],
                         ids=["serial", "tp2", "pp2-1f1b"])
def test_predicted_peak_memory_per_rank_within_10_percent(corpus_dir, tmp_path, nproc, layout):
    overrides = MODEL + [f"data.dir={corpus_dir}", f"train.out_dir={tmp_path / 'run'}", *layout]
    probe = [str(ROOT / "benchmarks" / "plan_memory_probe.py"), "--out", str(tmp_path), "--steps", "2",
             *overrides]
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(launch + probe, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg_layout = Layout.build(Config.from_yaml(None, overrides))
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank_*.json"))]
    assert len(rows) == nproc
    for row in rows:
        predicted = plan.memory_of(cfg_layout, row["coord"]["pp"], row["coord"]["dp"], "cpu").total
        assert row["measured"] > 0.9 * row["baseline_rss"]  # the model, not the process, dominates
        assert abs(row["measured"] / predicted - 1) <= 0.10, (row, predicted)
