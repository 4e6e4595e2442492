"""DeepSpeed ZeRO stages 1-3 as the optimizer of our model, over the data-parallel group only,
composed with our tensor parallelism (stages 1-2) and pipeline parallelism (stage 1): five AdamW steps match serial training on the same global
batch (losses, clipped grad norms, final weights). fp32; DeepSpeed sums gradients in its own
bucket order, so rounding-level tolerances (1e-5 relative). Needs the DeepSpeed extra."""

import os

import pytest

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.dist.harness import run_ranks  # noqa: E402
from tests.dist.test_data_parallel import _check  # noqa: E402

DS = "optim.zero.backend=deepspeed"


@pytest.mark.slow
def test_deepspeed_zero_stages_dp2(corpus_dir, tmp_path):
    run_ranks(_check, 2, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2", DS, f"optim.zero.stage={s}") for s in (1, 2, 3)])


@pytest.mark.slow
def test_deepspeed_zero_with_tensor_and_pipeline_parallel(corpus_dir, tmp_path):
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2", "parallel.tp=2", DS, f"optim.zero.stage={s}") for s in (1, 2)] +
              [("parallel.dp=2", "parallel.pp=2", DS, "optim.zero.stage=1")])
