"""The published throughput the step-time model is checked against, and how GEMM_EFFICIENCY was
fitted on it (tests/unit/test_plan.py and benchmarks/bench_plan.py both read this).

NARAYANAN_2021_TABLE1 is Table 1 ("Weak-scaling throughput for GPT models ranging from 1 billion to
1 trillion parameters") of D. Narayanan et al., "Efficient Large-Scale Language Model Training on
GPU Clusters Using Megatron-LM", SC'21, arXiv:2104.04473 (v5), §5.1. Setup stated there: NVIDIA
Selene, DGX A100 nodes (8 x 80 GB A100, NVLink/NVSwitch, 8 x 200 Gb/s HDR InfiniBand per node),
mixed precision, vocabulary 51,200, sequence 2048, "the interleaved pipeline schedule with the
scatter/gather optimization enabled", activation recomputation (their eq. 3 counts the extra
forward), achieved teraFLOP/s per GPU computed with eq. 3, peak 312 TFLOP/s. The paper does not
give the micro-batch size or the number of virtual stages of these runs; we use micro-batch 1 (its
PTD-P runs in Table 2 and §5.3-5.4 use 1) and let the planner pick v (up to 8). The rows were read
from the paper's text as stored by the `search` tool's code corpus (two independent transcriptions
of the paper, stored ids 63285939983 and 62002617932, plus two reading notes, ids 66766946069 and
55320678230, all with identical numbers); Megatron-LM's README (github.com/NVIDIA/Megatron-LM)
showed the same table as an image in 2021.
"""

from __future__ import annotations

from functools import lru_cache

from ..config import Config
from ..layout import Layout
from .cluster import MEGATRON_2021, Cluster, Profile
from .search import build_config, candidate_overrides
from .timing import GEMM_EFFICIENCY, Timing, step_time

# params (B), attention heads, hidden, layers, tp, pp, GPUs, global batch, achieved TFLOP/s per GPU
NARAYANAN_2021_TABLE1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
TABLE1_SOURCE = "Narayanan et al. 2021, arXiv:2104.04473, Table 1 (A100, seq 2048, V 51200)"


def table1_config(row) -> Config:
    _, heads, hidden, layers, *_ = row
    return Config.from_dict({
        "model": {"vocab_size": 51200, "hidden_size": hidden, "num_layers": layers,
                  "num_attention_heads": heads, "max_sequence_length": 2048},
        "train": {"precision": "bf16", "recompute": "full"},
    }).validate()


@lru_cache(maxsize=64)  # a row's prediction is asked for by several tests and the benchmark
def table1_prediction(row, gemm_efficiency: float = GEMM_EFFICIENCY) -> tuple[Timing, int, Layout]:
    """The paper's layout (tp, pp, dp = GPUs / tp / pp, batch, interleaving when pp > 1, recompute,
    bf16, no sequence parallelism: it came a year later), micro-batch 1, the best v: (timing, v, layout)."""
    _, _, _, _, tp, pp, gpus, batch, _ = row
    cfg = table1_config(row)
    cluster = Cluster.preset("a100-80gb", nodes=gpus // 8)
    best = None
    for ov in candidate_overrides(cfg, cluster, batch, micro_batch_sizes=(1,),
                                  schedules=("interleaved",) if pp > 1 else ("1f1b",),
                                  max_virtual_stages=8, zero=((0, "native"),), sequence_parallel="off",
                                  tp_values=[tp], pp_values=[pp]):
        layout = Layout.build(build_config(cfg, {**ov, "train.recompute": "full"}), gpus)
        timing = step_time(layout, cluster, MEGATRON_2021, gemm_efficiency)
        if best is None or timing.step_s < best[0].step_s:
            best = (timing, ov["parallel.virtual_stages"], layout)
    return best


def fit_gemm_efficiency(layout: Layout, cluster: Cluster, tflops_per_gpu: float,
                        profile: Profile = MEGATRON_2021) -> float:
    """The GEMM efficiency at which step_time predicts `tflops_per_gpu` for `layout` (bisection:
    the prediction grows monotonically with it). How GEMM_EFFICIENCY was obtained."""
    lo, hi = 0.01, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if step_time(layout, cluster, profile, mid).tflops_per_gpu < tflops_per_gpu:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
