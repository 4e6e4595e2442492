"""Finishing a step's gradients and clipping them by the global norm: the one place that does it,
for the trainer's backends, the parity tests and the benchmarks alike.

After the backward passes of one optimizer step, a rank's gradients still need, in this order:
  1. the mean over data-parallel replicas: not here — with dp > 1 the native backends always use
     the distributed optimizer (optim/distributed.py), whose buckets reduce during the backward,
  2. under sequence parallelism, the sum over tp of the grads of replicated parameters that saw
     only a sequence shard (norm weights, row-parallel biases),
  3. under pipelining with tied embeddings, the sum of the first and last stage's copies, so both
     take the same step and stay identical;
then the global L2 norm counts every parameter of the model once: tp-sharded squares summed over
tp, replicated ones taken once, every stage's share summed over pp, the last stage's tied copy
left out.

    sync = GradSync(tp_group=..., pp_group=..., embed_group=...)
    norm = sync.finish_and_clip(model, max_norm)      # = sync.finish(model); sync.clip(model, max_norm)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..distributed import comm


@dataclass(frozen=True)
class GradSync:
    tp_group: object = None
    pp_group: object = None
    embed_group: object = None  # first + last pipeline stage (tied embedding); None if pp == 1

    @property
    def serial(self) -> bool:
        return self.tp_group is None and self.pp_group is None

    def finish(self, model: nn.Module) -> None:
        """Steps 2-3 above, in place."""
        if self.tp_group is not None:
            sync_sequence_parallel_grads(model, self.tp_group)
        if self.pp_group is not None:
            sync_tied_embeddings(model, self.embed_group)

    def finish_and_clip(self, model: nn.Module, max_norm: float) -> float:
        """Finish the gradients, then clip them (below); returns the norm before clipping."""
        self.finish(model)
        return self.clip(model, max_norm)

    def clip(self, model: nn.Module, max_norm: float) -> float:
        """Scale finished gradients so the global norm is at most max_norm (0: no clipping);
        returns the norm before clipping. A non-finite norm leaves them unscaled."""
        if self.serial:  # torch's own clip: the serial reference every parity test compares with
            return torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                  max_norm if max_norm > 0 else math.inf).item()
        params = [p for p in model.parameters() if p.grad is not None]
        copy = tied_embedding_copy(model) if self.pp_group is not None else None
        duplicates = (copy,) if copy is not None and not model.has_embed else ()
        norm = global_norm(params, self.tp_group, self.pp_group, duplicates)
        if max_norm > 0 and math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                for p in params:
                    p.grad.detach().mul_(coef)
        return norm


@dataclass(frozen=True)
class GradRun:
    """Gradients global_norm reads without a parameter: a flat run of them (one tag for all)."""
    grad: torch.Tensor
    tensor_parallel: bool = False


def global_norm(params: list[torch.Tensor], tp_group, pp_group=None,
                duplicates: tuple[torch.Tensor, ...] = (), shard_group=None, experts=None) -> float:
    """L2 norm of the grads of `params` (parameters, or GradRuns): tp-sharded ones (tagged
    tensor_parallel) summed over tp, replicated ones counted once, every pipeline stage's share summed
    over pp; `duplicates` (e.g. the last stage's copy of a tied embedding) not counted. shard_group:
    the params are disjoint shards over this group (the distributed optimizer's data-parallel
    shards): summed over it. experts: (params, shard_group, ep_group) of expert-parallel parameters,
    kept apart: their shards summed over their own group, then the disjoint experts over ep_group."""
    total = _squares(params, tp_group, duplicates, shard_group)
    if experts is not None:
        expert_params, expert_shards, ep_group = experts
        total = total + comm.all_reduce(_squares(expert_params, tp_group, (), expert_shards), ep_group)
    if pp_group is not None:
        comm.all_reduce(total, pp_group)
    return math.sqrt(total.item())


def _squares(params: list[torch.Tensor], tp_group, duplicates, shard_group) -> torch.Tensor:
    """The sum of squares of global_norm, before the sum over pipeline stages."""
    device = params[0].grad.device if params else torch.device("cpu")
    acc = torch.promote_types(params[0].grad.dtype if params else torch.float32,
                              torch.float32)  # fp64 in tests
    sharded = torch.zeros((), dtype=acc, device=device)
    replicated = torch.zeros((), dtype=acc, device=device)
    skip = {id(d) for d in duplicates}
    for p in params:
        if id(p) in skip:
            continue
        sq = p.grad.detach().to(acc).pow(2).sum()
        if getattr(p, "tensor_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if tp_group is not None:
        comm.all_reduce(sharded, tp_group)
    total = sharded + replicated
    if shard_group is not None:
        comm.all_reduce(total, shard_group)
    return total


def sync_sequence_parallel_grads(model: nn.Module, group) -> None:
    """Sum over tp the grads of replicated params that saw only a sequence shard: one bucket."""
    grads = [p.grad for p in model.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads or comm.size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group)
    for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(new.view_as(g))


def tied_embedding_copy(model) -> torch.Tensor | None:
    """This stage's copy of a tied embedding that another stage also holds, if any: the input
    embedding on the first stage, the LM-head weight on the last (pp > 1 only)."""
    if not model.config.tie_embeddings or (model.has_embed and model.has_head):
        return None
    if model.has_embed:
        return model.tok_emb.weight
    if model.has_head:
        return model.lm_head.weight
    return None


def sync_tied_embeddings(model, embed_group) -> None:
    """Sum the tied embedding's gradient over its first- and last-stage copies (Megatron's
    embedding group), so both copies take the same optimizer step and stay identical."""
    w = tied_embedding_copy(model)
    if w is not None and w.grad is not None and embed_group is not None:
        comm.all_reduce(w.grad, embed_group)


def nan_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """loss, whose gradient becomes NaN everywhere when loss is not finite (no host sync). For an
    optimizer that skips a step on a non-finite gradient norm but never sees the loss: a loss of
    inf can have finite gradients (e.g. a -inf target logit), which it would otherwise apply."""
    scale = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
    return loss * scale
