"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, so the step counter is the scheduler's whole state:
a resumed run recomputes exactly the learning rate the uninterrupted run would have used.
"""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig
from .adamw import make_adamw


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never norms or biases (all 1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """torch's AdamW over the whole model (decay groups as above)."""
    return make_adamw(param_groups(model, cfg.weight_decay), cfg)


class PlainAdamW:
    """fp32 weights with their gradients in .grad, GradSync's sums, and torch's AdamW over the whole
    model: train.precision=fp32 with one data-parallel replica (serial, tp, pp), the reference every
    other layout is compared with. The same interface as DistributedOptimizer:
        begin_accumulation(backwards)  zero_grad()  finish()  clip(max_norm) -> norm  step()
        settle()  param_groups  finished_grad(p)
        checkpoint_view() -> what the checkpoint's Stateful needs besides the model"""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, sync):
        self.model = model
        self.sync = sync  # parallel.grads.GradSync
        self.adamw = build_optimizer(model, cfg)

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups

    def begin_accumulation(self, backwards: int) -> None:
        pass  # nothing is reduced during the backward

    def settle(self) -> None:
        pass  # nothing is ever in flight

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)

    def finish(self) -> None:
        self.sync.finish(self.model)

    def clip(self, max_norm: float) -> float:
        return self.sync.clip(self.model, max_norm)

    def step(self) -> None:
        self.adamw.step()

    def finished_grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def checkpoint_view(self) -> dict:
        return {"optimizer": self.adamw}


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, precision: str, sync, dp_group=None,
                   overlap_grad_reduce: bool = True, overlap_param_gather: bool = True,
                   expert_groups=(None, None), lookup_tokens: int | None = None):
    """The optimizer of the native backends: PlainAdamW for fp32 with one replica (exactly the
    serial reference), else the distributed optimizer: bf16 weights with fp32 main gradients and
    masters, and/or data parallelism over dp_group — its buckets reduce during the backward
    (overlap_grad_reduce), ZeRO-1-3 shard over it. `sync` is the layout's GradSync (tp, pp groups);
    expert_groups: (expert-data-parallel, expert-parallel) groups under parallel.ep > 1; lookup_tokens:
    the tokens of a micro-batch on this rank (whether the lookup's gradient travels as rows)."""
    if precision == "fp32" and dp_group is None:
        return PlainAdamW(model, cfg, sync)
    from .distributed import DistributedOptimizer
    return DistributedOptimizer(model, cfg, dp_group=dp_group, tp_group=sync.tp_group,
                                pp_group=sync.pp_group, embed_group=sync.embed_group,
                                dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                                stage=cfg.zero.stage, bucket_elements=cfg.zero.bucket_elements,
                                overlap_grad_reduce=overlap_grad_reduce,
                                overlap_param_gather=overlap_param_gather,
                                expert_dp_group=expert_groups[0], ep_group=expert_groups[1],
                                lookup_tokens=lookup_tokens)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at decay_steps."""
    decay_steps = cfg.decay_steps or total_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
