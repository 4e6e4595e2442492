"""`megatron-lite plan`: which layout to train a model with on a given cluster, predicted before any
GPU is booked.

    cluster = Cluster.preset("a100-80gb", nodes=4)
    result = plan(Config.from_yaml("configs/gpt-1.3b.yaml"), cluster, global_batch=512)
    print(format_table(result, top=10))

Every candidate (tp x cp x pp x dp and the cp algorithm, sequence parallelism, schedule and virtual
stages, micro-batch size, ZeRO stage and backend) is built with `Layout.build(cfg, world_size)`, the
object training builds, so a layout training would refuse is never proposed (LayoutError: skipped
and counted). For each valid one the model predicts, per rank, memory and step time. The modules:

  cluster      Cluster presets, implementation Profiles, collective and p2p times
  stage        what one rank holds (a meta-device GPT of its stage, sliced by the TP table) and
               the schedule simulator's facts (in-flight micro-batches, bubble, sends)
  memory       peak bytes per rank: weights, grads, optimizer, activations, pipeline buffers
  timing       step time as compute + tp + cp + pp + dp terms; GEMM_EFFICIENCY, the one calibrated constant
  search       enumerate, validate through Layout.build, predict, rank: plan()
  report       the table and the JSON
  calibration  Narayanan et al. 2021 Table 1 and fit_gemm_efficiency (tests and benchmarks read it)
  cli          the sub-parser and command

Numbers reported: predicted step time, tokens/s, TFLOP/s per GPU (hardware FLOPs, recompute
included: what Narayanan et al. report), MFU (model FLOPs, model/counts.py), communication share,
bubble. Parameter and FLOP counts are the model's own (model/counts.py).

Names resolve lazily (PEP 562), so registering the sub-parser does not import torch.
"""

from __future__ import annotations

from ..lazy import lazy_names

_EXPORTS = {
    "cluster": ["CLUSTERS", "GB", "MEGATRON_2021", "OURS", "Cluster", "Profile"],
    "stage": ["RankParams", "ScheduleFacts", "rank_params", "schedule_facts", "stage_params"],
    "memory": ["Memory", "memory_of", "peak_memory"],
    "timing": ["GEMM_EFFICIENCY", "Timing", "step_time"],
    "search": ["DEFAULT_ZERO", "ZERO_NAMES", "Candidate", "PlanResult", "build_config",
               "candidate_overrides", "plan"],
    "report": ["format_table", "override_args", "write_json"],
    "calibration": ["fit_gemm_efficiency"],
    "cli": ["add_parser", "resolve_config"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


__getattr__ = lazy_names(__name__, _WHERE)


def __dir__() -> list[str]:
    return __all__
