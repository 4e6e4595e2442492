"""DeepSpeed ZeRO as the optimizer of our own tensor/data-parallel model (imported only when
optim.zero.backend=deepspeed).

DeepSpeed gets:
  - the model as we built it (already tensor-parallel), and our AdamW (client optimizer) with the
    weight-decay groups; ZeRO shards its state (stage 1), + gradients (2), + parameters (3) over
    the *data-parallel group only*, because
  - an `mpu` built from our Topology: DeepSpeed asks it for the data-parallel group to partition
    over and for the model-parallel group to sum the gradient norm over; params we shard over tp
    carry `tensor_model_parallel = True`, so replicated ones are counted once when clipping;
  - under pipelining, our engine runs the schedule (autograd backward outside DeepSpeed, as
    DeepSpeed's own pipeline engine does) and then asks ZeRO to reduce the gradients; DeepSpeed's
    norm sums over the model-parallel group (tp x pp), counting replicated params on tp rank 0
    of every stage and skipping the last stage's tied-embedding copy;
  - a config built from our typed config: micro-batch, accumulation steps, an explicit
    gradient_clipping (DeepSpeed's default would clip at 1.0 silently), bf16 with fp32 gradient
    accumulation when asked.
"""

from __future__ import annotations

import torch

from ..distributed.env import export as export_env
from ..layout import Layout
from ..parallel.grads import tied_embedding_copy


class TopologyMPU:
    """The model-parallel-unit interface DeepSpeed expects, answered from our Topology."""

    def __init__(self, topology, groups):
        self.t, self.g = topology, groups
        self.coord = groups.coord

    def get_model_parallel_rank(self):
        return self.coord.tp + self.t.tp * self.coord.pp

    def get_model_parallel_world_size(self):
        return self.t.tp * self.t.pp

    def get_model_parallel_group(self):
        return self.g.mp

    def get_data_parallel_rank(self):
        return self.coord.dp

    def get_data_parallel_world_size(self):
        return self.t.dp

    def get_data_parallel_group(self):
        return self.g.dp

    def get_tensor_model_parallel_rank(self):
        return self.coord.tp

    def get_tensor_model_parallel_world_size(self):
        return self.t.tp

    def get_tensor_model_parallel_group(self):
        return self.g.tp

    def get_tensor_model_parallel_src_rank(self):
        return self.g.tp_ranks[0]

    def get_pipeline_model_parallel_rank(self):
        return self.coord.pp

    def get_pipeline_model_parallel_world_size(self):
        return self.t.pp

    def get_pipeline_model_parallel_group(self):
        return self.g.pp


def ds_config(layout: Layout) -> dict:
    # Under pipelining our engine accumulates the micro-batches (scaling each loss by 1/m) and
    # DeepSpeed sees one backward per step.
    cfg, m = layout.config, layout.micro_batches
    accumulation = 1 if layout.pp > 1 else m
    # A non-finite gradient norm makes DeepSpeed skip the update (weights and optimizer state
    # untouched): the trainer's non-finite policy. Both switches are its defaults; stated here so a
    # changed default cannot silently apply a NaN step.
    zero = {"stage": cfg.optim.zero.stage, "compute_grad_norm": True}
    if cfg.optim.zero.stage == 3:
        # Gather every parameter for every forward: the small test models must not be left partitioned.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size * (m // accumulation),
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.train.precision == "bf16":
        out["bf16"] = {"enabled": True, "check_grad_overflow": True}
        out["data_types"] = {"grad_accum_dtype": "fp32"}  # fp32 master weights and accumulation
    return out


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: Layout, groups,
               local_rank: int = 0):
    """Wrap model + optimizer in a DeepSpeed engine partitioning over the dp group."""
    # DeepSpeed reads these from the environment itself (it insists on LOCAL_RANK even when the
    # process group exists): our run environment written back for it.
    export_env({"DS_ACCELERATOR": "cuda" if next(model.parameters()).is_cuda else "cpu",
                "LOCAL_RANK": str(local_rank)}, overwrite=False)
    import deepspeed
    for p in model.parameters():
        if getattr(p, "tensor_parallel", False):
            p.tensor_model_parallel = True  # DeepSpeed's marker: sharded over tp, sum its norm
    if layout.pp > 1:
        copy = tied_embedding_copy(model)
        if copy is not None and not model.has_embed:
            copy.ds_pipe_replicated = True  # the last stage's copy: DeepSpeed's norm skips it
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(layout),
                                           mpu=TopologyMPU(layout.topology, groups), dist_init_required=False)
    return engine
