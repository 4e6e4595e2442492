"""The one interface the trainer drives, whatever the parallelism (Megatron's schedule pattern:
one forward-backward signature whether or not pipelining is on).

    loss = backend.forward_backward(batches)                     # mean loss of the global batch
    out = backend.step(lr, loss)                                  # finish, clip, check, apply
    loss = backend.forward_backward(batches, forward_only=True)  # evaluation
    pieces = backend.stateful()                                   # what a checkpoint saves
    handle = backend.on_grads_finished(hook)   # hook(name, grad) each step, before clipping
    backend.settle()                     # wait for communication still in flight (end of a run)

Three implementations, picked by build_backend() from the Layout:
    LocalBackend      serial, tensor-parallel, data-parallel, bf16, native ZeRO 1-2: micro-batches in a loop
    PipelineBackend   the same optimizer step; the micro-batches run through the pipeline schedule
    DeepSpeedBackend  DeepSpeed ZeRO 1-3 owns reduction, clipping and the update (with or without
                      our pipeline engine)

One non-finite policy for all of them: a step whose global loss or gradient norm is not finite is
skipped, and leaves the weights and the optimizer state exactly as they were. Our backends check
before calling the optimizer; DeepSpeed skips a step whose gradient norm is not finite itself, and a
non-finite loss is turned into a NaN gradient first (nan_if_nonfinite) so it never slips through
with finite gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.hooks import RemovableHandle

from ..checkpoint import Stateful
from ..distributed import comm
from ..layout import Layout
from ..model.gpt import split_batch
from ..model.moe import MoE, RouterStats
from ..optim import build_optimizer, make_optimizer, set_lr
from ..parallel.grads import GradSync, nan_if_nonfinite, sync_tied_embeddings
from ..pipeline.engine import PipelineEngine

# (ids, labels) or (ids, labels, model.gpt.Documents) per micro-batch
Batches = list[tuple]
# Called with (global parameter name, this rank's finished gradient of it) once per step.
GradHook = Callable[[str, torch.Tensor], None]


@dataclass
class StepOutcome:
    grad_norm: float  # global norm before clipping
    skipped: bool  # True: loss or norm not finite, nothing was applied


class Backend:
    """Base: a model (this rank's part of it), its optimizer, the data-parallel loss average."""

    def __init__(self, model, optimizer, dp_group, autocast, rng_tracker=None, grad_owner=None):
        self.model = model
        self.optimizer = optimizer
        self.dp_group = dp_group
        self.autocast = autocast
        self.rng_tracker = rng_tracker
        self.grad_owner = grad_owner or optimizer  # the torch optimizer over the model's own .grad
        # Labels may be ignored (-100, data.mask_separator_loss): weigh micro-batches by their counted
        # targets (loss_weights; one scalar all-reduce per step). Else each counts alike, for free.
        self.weigh_targets = False
        self.pp_group = None  # the pipeline stages, whose MoE layers' metrics router_metrics() sums
        # the tp ranks when sequence parallelism splits the tokens the MoE layers route among them
        self.token_group = None
        self._grad_hooks: OrderedDict[int, GradHook] = OrderedDict()  # RemovableHandle holds a weakref

    def forward_backward(self, batches: Batches, forward_only: bool = False) -> float:
        """Run this rank's micro-batches of one global batch (forward and backward, or forward
        only); returns the mean loss over the whole global batch, the same on every rank."""
        self.model.train(not forward_only)
        # MoE's auxiliary losses join the objective as the main loss does: averaged over micro-batches
        self.router_stats.scale = 1.0 / len(batches)
        if not forward_only:
            self.grad_owner.zero_grad(set_to_none=True)
            self._begin_accumulation(len(batches))
        weights = loss_weights(batches, self.dp_group) if self.weigh_targets else [1.0] * len(batches)
        total = self._run(batches, forward_only, weights)
        if self.dp_group is not None:
            comm.all_reduce(total, self.dp_group)
            total = total / comm.size(self.dp_group)
        return total.item()

    def _run(self, batches: Batches, forward_only: bool, weights: list[float]) -> torch.Tensor:
        """The micro-batches' mean loss, micro-batch j's weighted by weights[j] (loss_weights)."""
        raise NotImplementedError

    def _begin_accumulation(self, backwards: int) -> None:
        """This rank's step will run `backwards` backward passes (one per micro-batch)."""

    def settle(self) -> None:
        """Wait for any communication still in flight (e.g. the weights' all-gather that a step
        leaves running behind the next forward): before reading the weights outside a forward or
        leaving the process group."""

    def step(self, lr: float, loss: float) -> StepOutcome:
        """Finish the accumulated gradients, clip them, and apply them at learning rate lr unless
        the loss or the gradient norm is not finite; then move the MoE routers' balancing biases
        by the step's expert load (model.moe.bias_update_rate)."""
        out = self._step(lr, loss)
        if not out.skipped:
            self._update_router_bias()
        return out

    def _step(self, lr: float, loss: float) -> StepOutcome:
        raise NotImplementedError

    @property
    def router_stats(self) -> RouterStats:
        return self.model.router_stats

    def _moe_layers(self) -> list[MoE]:
        return [m for m in self.model.modules() if isinstance(m, MoE)]

    def _update_router_bias(self) -> None:
        layers = [m for m in self._moe_layers() if m.bias_rate > 0]
        if not layers:
            return
        loads = torch.stack([m.load_since_update if m.load_since_update is not None
                             else torch.zeros_like(m.expert_bias, dtype=torch.long) for m in layers])
        # (layers, E): the step's tokens per expert, this rank's
        for group in (self.dp_group, self.token_group):
            if group is not None:
                comm.all_reduce(loads, group)  # every rank moves its biases alike
        for m, load in zip(layers, loads, strict=True):
            m.update_bias(load)

    def router_metrics(self) -> dict[str, float]:
        """The MoE layers' load and loss metrics since the last call, over the data-parallel ranks
        and the pipeline stages, and the tp ranks under sequence parallelism (every rank must call it:
        an all-reduce per group); {} without MoE."""
        groups = [g for g in (self.dp_group, self.pp_group, self.token_group) if g is not None]

        def reduce(t):
            for g in groups:
                comm.all_reduce(t, g)
        device = next(self.model.parameters()).device
        return self.router_stats.take(reduce if groups else None, device)

    def stateful(self) -> Stateful:
        return Stateful(self.model, self.optimizer, self.rng_tracker)

    def on_grads_finished(self, hook: GradHook) -> RemovableHandle:
        """Call hook(global parameter name, gradient) for every parameter of this rank's model in
        each step(), once the gradients are finished (data-parallel mean, sequence-parallel and
        tied-embedding sums) and before they are clipped and applied. The gradient is this rank's
        (tensor-parallel) slice, zeros for a parameter that got none. Every rank must register the
        same hooks: DeepSpeed gathers each gradient over the data-parallel group. `.remove()` on
        the returned handle unregisters the hook."""
        handle = RemovableHandle(self._grad_hooks)
        self._grad_hooks[handle.id] = hook
        return handle

    def _call_grad_hooks(self) -> None:
        if not self._grad_hooks:
            return
        for name, p in self.model.named_parameters():
            grad = self._finished_grad(p)
            for hook in list(self._grad_hooks.values()):
                hook(name, grad)

    def _finished_grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)


def loss_weights(batches: Batches, group) -> list[float]:
    """Each micro-batch's loss weight, so that the step's loss (and gradient) is the mean over every
    counted target of the global batch rather than the mean of the micro-batches' means: a
    micro-batch (or context-parallel shard) whose targets are partly ignored (label -100, e.g.
    data.mask_separator_loss) counts for its share of the targets. `group` holds the other ranks'
    micro-batches (dp x cp; None: this rank alone). All 1.0 when every micro-batch counts alike,
    which is the layout-independent answer without ignored targets."""
    counts = torch.stack([(split_batch(b)[1] != -100).sum() for b in batches]).double()  # (m,)
    total = counts.sum()
    units = len(batches)
    if group is not None:
        comm.all_reduce(total, group)
        units *= comm.size(group)
    if total.item() == 0:
        return [1.0] * len(batches)
    return (counts * units / total).tolist()


def _accumulate(model, batches: Batches, forward_only: bool, autocast, backward,
                weights: list[float]) -> torch.Tensor:
    """Mean loss of the micro-batches, each weighted (loss_weights); each weighted loss is handed to
    `backward` (unless forward only)."""
    total = torch.zeros((), device=batches[0][0].device)
    grad = torch.no_grad() if forward_only else contextlib.nullcontext()
    for batch, w in zip(batches, weights, strict=True):
        x, y, docs = split_batch(batch)
        with grad, autocast():
            _, loss = model(x, y, docs=docs)
        if w != 1.0:
            loss = loss * w
        if not forward_only:
            backward(loss)
        total += loss.detach().float()
    return total / len(batches)


class LocalBackend(Backend):
    """Serial / tensor / data parallelism, bf16 and native ZeRO 1-2: gradient accumulation over the
    micro-batches, then the optimizer (optim.PlainAdamW or optim.distributed.DistributedOptimizer)
    finishes the gradients (dp mean, sequence-parallel and tied-embedding sums), clips and steps."""

    def __init__(self, model, optimizer, grad_clip: float, dp_group, autocast, rng_tracker=None):
        super().__init__(model, optimizer, dp_group, autocast, rng_tracker)
        self.grad_clip = grad_clip

    def _begin_accumulation(self, backwards: int) -> None:
        self.optimizer.begin_accumulation(backwards)  # lets finished buckets reduce mid-backward

    def settle(self) -> None:
        self.optimizer.settle()

    def stateful(self) -> Stateful:
        """The weights, and the AdamW state (and fp32 masters) as the optimizer exposes them."""
        return Stateful(self.model, rng_tracker=self.rng_tracker, **self.optimizer.checkpoint_view())

    def _run(self, batches, forward_only, weights):
        m = len(batches)
        return _accumulate(self.model, batches, forward_only, self.autocast,
                           lambda loss: (loss / m).backward(), weights)

    def _step(self, lr: float, loss: float) -> StepOutcome:
        set_lr(self.optimizer, lr)
        self.optimizer.finish()
        self._call_grad_hooks()
        norm = self.optimizer.clip(self.grad_clip)
        skipped = not (math.isfinite(loss) and math.isfinite(norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        return StepOutcome(norm, skipped)

    def _finished_grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.optimizer.finished_grad(p)


class PipelineBackend(LocalBackend):
    """The local optimizer step; the micro-batches run through this stage's pipeline schedule."""

    def __init__(self, engine: PipelineEngine, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = engine

    def _run(self, batches, forward_only, weights):
        return self.engine.run(batches, forward_only=forward_only, weights=weights).float()


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO owns the data-parallel reduction, the clipping and the update. Without
    pipelining, its engine runs each micro-batch (its step() closes the accumulation window); with
    it, our schedule runs the backward and ZeRO reduces afterwards."""

    def __init__(self, ds, client_optimizer, model, dp_group, autocast, engine: PipelineEngine | None = None,
                 embed_group=None, rng_tracker=None):
        super().__init__(model, ds.optimizer, dp_group, autocast, rng_tracker, grad_owner=client_optimizer)
        self.ds = ds
        self.client_optimizer = client_optimizer  # our AdamW, inside DeepSpeed's ZeRO wrapper
        self.engine = engine
        self.embed_group = embed_group

    def _run(self, batches, forward_only, weights):
        if self.engine is not None:
            total = self.engine.run(batches, forward_only=forward_only, weights=weights).float()
            if not forward_only:
                sync_tied_embeddings(self.model, self.embed_group)
                self.ds.optimizer.reduce_gradients(pipeline_parallel=True)
            return total
        if forward_only:
            return _accumulate(self.model, batches, True, self.autocast, None, weights)
        m, seen = len(batches), [0]

        def backward(loss):
            self.ds.backward(nan_if_nonfinite(loss))
            seen[0] += 1
            if seen[0] < m:  # the last micro-batch's step() is the optimizer step, in step()
                self.ds.step()
        # DeepSpeed's bf16 mode holds bf16 weights itself: no autocast around its engine.
        return _accumulate(self.ds, batches, False, contextlib.nullcontext, backward, weights)

    def _step(self, lr: float, loss: float) -> StepOutcome:
        set_lr(self.client_optimizer, lr)
        set_lr(self.ds.optimizer, lr)
        self._call_grad_hooks()  # reduced by its last backward (or reduce_gradients); step clips
        self.ds.step()  # skips (weights, moments untouched) when its gradient norm is not finite
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return StepOutcome(norm, not (math.isfinite(loss) and math.isfinite(norm)))

    def _finished_grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The whole gradient of this rank's parameter from DeepSpeed's partitions (a collective
        over the data-parallel group), through its own per-parameter API."""
        from deepspeed.utils import safe_get_full_grad
        grad = safe_get_full_grad(p)
        return grad if grad is not None else torch.zeros(getattr(p, "ds_shape", p.shape), device=p.device)

    def stateful(self) -> Stateful:
        """DeepSpeed's fp32 masters and AdamW moments, per parameter, through its tensor-fragment
        API (each `get` gathers over the data-parallel group): the checkpoint stores them like any
        backend's, so it does not depend on DeepSpeed's own (pickled) files or its partitioning."""
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )
        inner = self.ds.optimizer.optimizer  # the torch AdamW over DeepSpeed's flat fp32 partitions
        self._ensure_optimizer_state()

        def get_state(p):
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            steps = [st["step"] for st in inner.state.values() if "step" in st]
            if any(v is None for v in moments.values()) or not steps:
                return None
            return {**moments, "step": steps[0]}  # one step count for every partition

        def set_state(p, st):
            for k in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, st[k].to(p.device), k)
            for flat in inner.state.values():
                if "step" in flat:
                    flat["step"] = torch.as_tensor(st["step"]).clone().to(flat["step"])

        return Stateful(self.model, None, self.rng_tracker,
                        get_param=safe_get_full_fp32_param,
                        set_param=lambda p, v: safe_set_full_fp32_param(p, v.to(p.device)),
                        get_state=get_state, set_state=set_state)


    def _ensure_optimizer_state(self) -> None:
        """AdamW state for every flat fp32 partition, and DeepSpeed's per-parameter views of it.
        A fresh engine (resuming) has none yet: create it as torch's AdamW would (step 0, zero
        moments) so the checkpoint's values can be written into it. DeepSpeed 0.19 links the views
        of ZeRO 1/2 after the first group's first step only, leaving the other groups' empty: relink."""
        zero = self.ds.optimizer
        inner = zero.optimizer
        # ZeRO-1/2, DeepSpeed's bf16 optimizer (bf16 with ZeRO-1), ZeRO-3: where each keeps its partitions
        kinds = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                 "fp32_partitioned_groups_flat")
        flats = next(getattr(zero, a) for a in kinds if getattr(zero, a, None))
        for flat in flats:
            if not inner.state.get(flat):
                inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                     "exp_avg_sq": torch.zeros_like(flat)}
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()


def build_backend(layout: Layout, model, groups, device: torch.device, autocast, rng_tracker=None,
                  local_rank: int = 0) -> Backend:
    """The backend for this layout, around this rank's (already parallelized) model. Under the
    native backends with train.precision=bf16 the optimizer turns the model's weights to bf16, and
    pipeline messages travel in bf16."""
    cfg = layout.config
    tp_group = groups.tp if groups is not None and layout.tp > 1 else None
    pp_group = groups.pp if groups is not None and layout.pp > 1 else None
    # the cp ranks of a replica see different tokens of the same samples: reduce over dp x cp
    dp_group = groups.dp_cp if groups is not None and layout.dp * layout.cp > 1 else None
    ds = layout.backend == "deepspeed"
    engine = None
    if pp_group is not None:
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" and not ds else torch.float32
        engine = PipelineEngine(model, layout.chunks(groups.coord.pp), groups.coord.pp, groups.pp_ranks,
                                pp_group, cfg.parallel.schedule, layout.act_shape, device, autocast=autocast,
                                dtype=dtype, poison_nonfinite=ds)
    if ds:
        from ..optim.deepspeed import initialize
        optimizer = build_optimizer(model, cfg.optim)
        wrapped = initialize(model, optimizer, layout, groups, local_rank)
        backend = DeepSpeedBackend(wrapped, optimizer, model, dp_group, autocast, engine, groups.embed,
                                   rng_tracker)
        backend.weigh_targets = cfg.data.mask_separator_loss
        return backend
    sync = GradSync(tp_group=tp_group, pp_group=pp_group,
                    embed_group=groups.embed if pp_group is not None else None)
    optimizer = make_optimizer(model, cfg.optim, cfg.train.precision, sync, dp_group,
                               overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                               overlap_param_gather=cfg.parallel.overlap_param_gather,
                               expert_groups=(groups.edp, groups.ep) if layout.ep > 1 else (None, None),
                               lookup_tokens=cfg.data.micro_batch_size * cfg.seq_length // layout.cp)
    args = (model, optimizer, cfg.optim.grad_clip, dp_group, autocast, rng_tracker)
    backend = PipelineBackend(engine, *args) if engine is not None else LocalBackend(*args)
    backend.weigh_targets = cfg.data.mask_separator_loss
    backend.pp_group = pp_group
    backend.token_group = tp_group if layout.sequence_parallel else None
    return backend
