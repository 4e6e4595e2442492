"""Optimizer and learning-rate schedule.

The schedule is a pure function of the step, so the step counter is the scheduler's whole state:
a resumed run recomputes exactly the learning rate the uninterrupted run would have used.
"""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never norms or biases (all 1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, dp_group=None) -> torch.optim.Optimizer:
    """AdamW; with optim.zero.stage=1 (native backend) and a data-parallel group, torch's
    ZeroRedundancyOptimizer: each dp rank keeps the AdamW state of its share of the parameters,
    steps those, and broadcasts them to the others."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.zero.stage == 1 and cfg.zero.backend == "native" and dp_group is not None:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        groups = [g for g in groups if g["params"]]
        zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                       process_group=dp_group, weight_decay=groups[0]["weight_decay"],
                                       **kwargs)
        for g in groups[1:]:
            zero.add_param_group(g)
        return zero
    return torch.optim.AdamW(groups, **kwargs)


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
