"""Mixed precision and the distributed optimizer (Megatron-LM's layout, ZeRO-1, -2 and -3).

The model's weights live in flat per-bucket buffers of the compute dtype (bf16 under
train.precision=bf16): activations, pipeline messages and tensor-parallel collectives are 16-bit.
Gradients are accumulated across micro-batches in fp32 "main gradients" (a hook on every parameter
adds its bf16 .grad in and drops it), reduced over the data-parallel group, and an fp32 master
copy of the weights with its AdamW moments takes the step; the updated masters are cast back into
the weight buffers. Sharding over the data-parallel group (d ranks), per bucket:

    optim.zero.stage  main grads                       masters + moments   bytes/param (bf16)
    0                 full, all-reduced                full                2 + 4 + 12     = 18
    1  (distributed)  full, reduce-scattered           this rank's 1/d     2 + 4 + 12/d
    2                 this rank's 1/d only: each bucket is reduce-scattered during backward as
                      soon as its last gradient arrives, and the fp32 bucket let go      2 + 16/d
    3                 as 2, and the weights too: each rank keeps its 1/d of every bucket's weights;
                      a bucket is gathered just in time and freed after use          18/d

Each bucket (a run of parameters in backward order, padded to a multiple of d) is cut into d equal
shards; rank r owns shard r of every bucket, so one parameter may be split between ranks. After the
step each rank's updated shard is all-gathered into every rank's weights. Under fp32 the master is
the weight buffer's shard itself (no copy).

ZeRO-3 (parameters sharded too, composing with tp, sp and pp like the other stages): one bucket per
transformer block, one for the rest of the stage's parameters (embeddings, final norm, head) and one
for a pipeline stage's copy of a tied embedding. A rest bucket holding both the embedding and the
head (one stage with both) stays gathered from the embedding's forward through the backward that
reduces it (as FSDP2 keeps its root), rather than gathered again for the head. The full weight
buffer keeps its place, and the parameters stay views of it, but its storage is released (resized to
nothing) whenever no forward or backward needs it. A forward pre-hook on the bucket's module (the
block; the embedding, norm and head modules for the rest) all-gathers the shards into the storage,
the forward hook frees it again and hooks the module's outputs, so that the gradient reaching them
gathers it once more for the backward, which keeps it until the bucket's last gradient has arrived
and been reduce-scattered. Autograd's saved weights are those views: they read the re-gathered
storage, and since the storage is refilled through the buffer, never through the parameter, the
parameters' version counters (and autograd's checks) never see a write. Full and selective recompute
work unchanged: a recomputation happens inside the backward, while the bucket is held.

Communication overlapped with computation (parallel.overlap_grad_reduce / overlap_param_gather,
both on by default; off, every collective runs where the step needs its result):
  - gradients: the backend says how many backward passes the step will run (begin_accumulation);
    stages 0-1 start a bucket's all-reduce / reduce-scatter asynchronously as soon as its last
    gradient of the step's last backward has been added in (no reduction during accumulation), so
    it runs while the backward computes the buckets before it; stages 2-3 do so after every
    backward (their fp32 gradients of one backward exist only until reduced): at most
    MAX_STAGING_BUCKETS staging buckets exist at once (the one filling and those in flight), and
    the end of each backward waits for the rest (an autograd callback, as FSDP does), so none
    lives on into the next forward. finish() waits for them all before the sums below and
    clipping, and starts any bucket that did not complete (a parameter without gradient).
  - weights, ZeRO-1/2: step() starts every bucket's all-gather of the updated shards in forward
    order and returns; a forward pre-hook on each module waits for its buckets' gather just before
    their first use, so the gathers run behind the next forward.
  - weights, ZeRO-3: a block's gather starts the next block's (forward) or the previous block's
    (backward) gather, so the bucket needed next arrives while this one computes: at most two
    blocks' full weights are held at a time.
Every rank runs the same backward, so every rank starts the same collectives in the same order.

The token embedding's lookup gradient travels sparse (dp > 1) where that is the smaller transfer
(lookup_rows_travel: every rank's rows of a micro-batch together fewer than the table's rows; at
scale, e.g. dp 128 x 8192 tokens against 16K rows of a tp shard of a 128K vocabulary, the table is
smaller and the gradient stays dense, reduced with its bucket after the lookup). Its backward is the
last of all, so in the buffer its (V, C) gradient would be the step's last reduction, exposed after
the backward (for a tied embedding, the largest one). Instead the lookup's gradient never enters
autograd (DeferredLookup: the optimizer installs it as the embedding's lookup): on a backward whose
gradients are reduced (the step's last for stages 0-1, every one for 2-3) the ids and the output's
gradient rows, N x C for N tokens against V x C, are all-gathered over the group and, once the
buffer's reduction is complete, every rank's rows are summed into their ids' rows of the reduced
(shard of the) gradient, in rank order, as embedding_dense_backward does; on the other backwards
they are added into the main gradient at once. A tied weight's bucket then holds only the head's
part, which is complete early in the backward and reduced behind it. The sums are those of the dense
path in another order, the same with and without overlap.

Finishing the gradients (the same sums GradSync does for the plain path, applied to this rank's
shard: they are all linear, so they commute with the data-parallel reduction):
  1. mean over the data-parallel group (all-reduce, or reduce-scatter),
  2. sequence parallelism: sum over tp of replicated parameters that saw a sequence shard,
  3. pipelining with tied embeddings: sum of the first and last stage's copies (the copy gets a
     bucket of its own, so both stages cut it into the same shards);
the global norm sums the shards' squares over dp (disjoint) as well as over tp and pp.

Expert parallelism (parallel.ep): the experts' parameters (tagged expert_parallel) are split over
the expert-parallel group, and the ranks holding the same experts form the expert-data-parallel
group (dp / ep ranks). Their buckets are their own, reduced, sharded and gathered over that group;
their gradient holds the contributions of every rank that sent them tokens, so it is averaged over
the whole data-parallel group (divided by dp, like the others). The global norm adds their squares
summed over the expert-data-parallel shards and then over the expert-parallel group (disjoint
experts) to the dense parameters'.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from ..distributed import comm
from ..parallel.grads import GradRun, global_norm, tied_embedding_copy
from ..parallel.layers import VocabParallelEmbedding
from .adamw import make_adamw

# Like Megatron-LM's default DDP bucket (40M elements): few collectives, bounded extra memory.
BUCKET_ELEMENTS = 40_000_000
# ZeRO-2/3: fp32 staging buckets alive at once, the one filling included (those in flight are held
# until their reduce-scatter is done): one reducing while the next fills keeps the link busy
# behind the backward, with memory bounded at two buckets' fp32 gradients.
MAX_STAGING_BUCKETS = 2


@dataclass
class Fragment:
    """The part [lo, hi) of a parameter's flattened elements that lies in this rank's shard of its
    bucket, at [shard_lo, shard_hi) of the shard."""
    param: torch.nn.Parameter
    bucket: "Bucket"
    lo: int
    hi: int
    shard_lo: int
    shard_hi: int
    master: torch.nn.Parameter  # fp32 view into the bucket's master shard; what AdamW steps


class Bucket:
    """A run of parameters sharing one flat weight buffer, reduced and gathered together."""

    def __init__(self, params: list[torch.nn.Parameter], shards: int, index: int, dtype: torch.dtype,
                 full_grads: bool, sharded_weights: bool = False, group=None):
        device = params[0].device
        self.params = params
        self.group = group  # the data-parallel group it is reduced, sharded and gathered over
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = -(-n // shards) * shards  # padded so the shards are equal
        self.shard_size = self.numel // shards
        self.lo = index * self.shard_size  # this rank's shard: [lo, lo + shard_size)
        # The fp32 values as they are now (initialised or loaded), for the master copy.
        fp32 = torch.zeros(self.numel, dtype=torch.float32, device=device)  # (numel,)
        for p, o in zip(params, self.offsets, strict=True):
            fp32[o:o + p.numel()] = p.detach().reshape(-1)
        shard = slice(self.lo, self.lo + self.shard_size)
        if sharded_weights:  # ZeRO-3: only this rank's shard persists; the full buffer is held on use
            self.weights = torch.empty(self.numel, dtype=dtype, device=device)  # (numel,)
            self.shard_weights = fp32[shard].to(dtype).clone()  # (numel/d,)
        else:
            # (numel,) what the model computes with
            self.weights = fp32.to(dtype) if dtype != torch.float32 else fp32
            self.shard_weights = self.weights[shard]  # (numel/d,) a view
        for p, o in zip(params, self.offsets, strict=True):
            p.data = self.weights[o:o + p.numel()].view_as(p)  # the parameter becomes a view of the bucket
        # fp32 weights are their own master; bf16 ones get an fp32 copy of this rank's shard.
        self.master = self.shard_weights if dtype == torch.float32 else fp32[shard].clone()  # (numel/d,)
        del fp32
        self.sharded_weights = sharded_weights
        self.gathered = not sharded_weights  # the full weights are in self.weights' storage
        self.pending = False  # ZeRO-3: a backward needs the weights until the last gradient arrives
        # ZeRO-3: used at the start and at the end of the forward (the embedding and the head of one
        # stage): held from the first use through the backward instead of gathered twice per forward
        self.hold_forward = False
        self.gathering: comm.Pending | None = None  # an all-gather into self.weights in flight
        if sharded_weights:
            self.release()
        # Stages 0-1: the full fp32 main-gradient buffer, this rank's shard a view of it. Stage 2:
        # only the shard; a backward's gradients pass through a transient fp32 staging bucket.
        self.grad = torch.zeros(self.numel, dtype=torch.float32, device=device) if full_grads else None
        self.grad_shard = self.grad[shard] if full_grads else \
            torch.zeros(self.shard_size, dtype=torch.float32, device=device)  # (numel/d,)
        self.staging: torch.Tensor | None = None
        self.arrived = 0  # gradients added since the bucket was last reduced
        self.launched = False  # stages 0-1: this step's reduction has been started

    def gather(self, group) -> None:
        """ZeRO-3: the full weights back into their storage (every rank's shard, all-gathered);
        returns when they are there."""
        self.start_gather(group)
        self.wait_gather()

    def start_gather(self, group) -> None:
        """ZeRO-3: start gathering the full weights (allocates their storage); wait_gather() before use."""
        if self.gathered:
            return
        self.weights.untyped_storage().resize_(self.numel * self.weights.element_size())
        self.gathering = comm.all_gather_into_async(self.weights, self.shard_weights, group)
        self.gathered = True

    def wait_gather(self) -> None:
        if self.gathering is not None:
            self.gathering.wait()
            self.gathering = None

    def release(self) -> None:
        """ZeRO-3: free the full weights' storage (the parameters' views keep their shapes)."""
        self.wait_gather()  # the collective still writes into it
        self.weights.untyped_storage().resize_(0)
        self.gathered = self.pending = False


class DistributedOptimizer:
    """AdamW over fp32 masters with fp32 main gradients, sharded over `dp_group` for stage >= 1
    (module docstring). The interface the trainer's backends drive, like PlainAdamW's:
        zero_grad()  finish()  clip(max_norm) -> norm  step()  param_groups  finished_grad(p)
        accessors() -> get_param/set_param/get_state/set_state for the checkpoint"""

    def __init__(self, model: torch.nn.Module, cfg, dp_group=None, tp_group=None, pp_group=None,
                 embed_group=None, dtype: torch.dtype = torch.bfloat16, stage: int = 1,
                 bucket_elements: int = BUCKET_ELEMENTS, overlap_grad_reduce: bool = True,
                 overlap_param_gather: bool = True, expert_dp_group=None, ep_group=None,
                 lookup_tokens: int | None = None):
        """expert_dp_group, ep_group: under expert parallelism, the groups of the parameters tagged
        expert_parallel (module docstring); None: every parameter is reduced over dp_group.
        lookup_tokens: the tokens of a micro-batch on this rank, which decide whether the embedding
        lookup's gradient travels as rows (lookup_rows_travel); None: it stays dense."""
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"stage {stage}")
        self.model = model
        self.dp_group, self.tp_group = dp_group, tp_group
        self.pp_group, self.embed_group = pp_group, embed_group
        self.dp = comm.size(dp_group) if dp_group is not None else 1
        self.stage = stage if self.dp > 1 else 0  # one replica: nothing to shard
        self.overlap_grad = overlap_grad_reduce and self.dp > 1
        self.overlap_param = overlap_param_gather and self.dp > 1
        self._backwards: int | None = None  # backward passes of this step (begin_accumulation)
        self._inflight: list[tuple[comm.Pending, object]] = []  # gradient reductions started, in order
        self._drain_queued = False  # stages 2-3: the end of this backward will wait for them
        self.dtype = dtype
        self.edp_group, self.ep_group = expert_dp_group, ep_group
        # reversed: about the order in which backward finishes them
        params = [p for p in model.parameters() if p.requires_grad][::-1]
        tied = tied_embedding_copy(model) if pp_group is not None else None
        if self.stage == 3:
            runs, users = _units(model, params, tied)
        else:
            runs, run, size = [], [], 0
            for p in params:
                if p is tied:
                    continue
                if run and size + p.numel() > bucket_elements:
                    runs.append(run)
                    run, size = [], 0
                run.append(p)
                size += p.numel()
            runs += [run] if run else []
            if tied is not None:  # a bucket of its own: the first and last stage shard it identically
                runs.append([tied])
            users = [[] for _ in runs]
        # experts' parameters in buckets of their own (another group reduces them), each run split
        runs, users = map(list, zip(*[(part, u) for r, u in zip(runs, users, strict=True)
                                      for part in _by_group(r, ep_group is not None) if part], strict=True))
        self.buckets = []
        for r in runs:
            group = self.group_of(r[0])
            shards = comm.size(group) if self.stage >= 1 and group is not None else 1
            self.buckets.append(Bucket(r, shards, comm.rank(group) if shards > 1 else 0, dtype,
                                       full_grads=self.stage < 2,
                                       sharded_weights=self.stage == 3 and shards > 1, group=group))
        self.bucket_of = {id(p): (b, o) for b in self.buckets
                          for p, o in zip(b.params, b.offsets, strict=True)}
        self.fragments: list[Fragment] = []
        for b in self.buckets:
            for p, o in zip(b.params, b.offsets, strict=True):
                lo, hi = max(o, b.lo), min(o + p.numel(), b.lo + b.shard_size)
                if lo >= hi:
                    continue
                master = torch.nn.Parameter(b.master[lo - b.lo:hi - b.lo], requires_grad=False)
                master.grad = b.grad_shard[lo - b.lo:hi - b.lo]  # persistent view: AdamW reads it
                master.tensor_parallel = getattr(p, "tensor_parallel", False)  # for global_norm
                self.fragments.append(Fragment(p, b, lo - o, hi - o, lo - b.lo, hi - b.lo, master))
        self.by_param: dict[int, list[Fragment]] = {}
        for f in self.fragments:
            self.by_param.setdefault(id(f.param), []).append(f)
        decay = [f.master for f in self.fragments if f.param.dim() >= 2]  # as optim.param_groups decides
        no_decay = [f.master for f in self.fragments if f.param.dim() < 2]
        self.adamw = make_adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], cfg)
        self._tied = tied
        self._sp = [f for f in self.fragments if getattr(f.param, "sequence_parallel", False)]
        # what the global norm reads: the last stage's copy of a tied embedding left out (the first
        # stage's counts it), expert parameters apart under expert parallelism
        counted = [f for f in self.fragments if not (f.param is tied and not model.has_embed)]
        self._norm_runs = (grad_runs([f for f in counted if ep_group is None or not _is_expert(f.param)]),
                           grad_runs([f for f in counted if _is_expert(f.param)]) if ep_group is not None
                           else None)
        # the embedding lookup's deferred gradient: lookups this step, gathers in flight
        self._lookups, self._gathered, self._lookup_only, self._deferred = 0, [], False, None
        self._defer_lookups(model, lookup_tokens)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for b in self.buckets for p in b.params]
        if self.stage == 3:  # gather each bucket just in time (module docstring)
            self._neighbours = _block_neighbours(model, self.buckets, users) if self.overlap_param else {}
            starts = {id(getattr(model, n, None)) for n in ("tok_emb", "pos_emb")} - {id(None)}
            ends = {id(getattr(model, n, None)) for n in ("ln_f", "lm_head")} - {id(None)}
            for b, modules in zip(self.buckets, users, strict=True):
                if not b.sharded_weights:  # (experts held whole by one rank of their group)
                    continue
                b.hold_forward = any(id(m) in starts for m in modules) and any(id(m) in ends for m in modules)
                for m in modules:
                    self._hooks += [m.register_forward_pre_hook(functools.partial(self._before_forward, b)),
                                    m.register_forward_hook(functools.partial(self._after_forward, b))]
        elif self.overlap_param:  # each module waits for its buckets' all-gather started by step()
            uses: dict[int, tuple[torch.nn.Module, set]] = {}
            for m in model.modules():
                for q in m.parameters(recurse=False):
                    if id(q) in self.bucket_of:
                        uses.setdefault(id(m), (m, set()))[1].add(self.bucket_of[id(q)][0])
            for m, buckets in uses.values():
                self._hooks.append(m.register_forward_pre_hook(
                    functools.partial(self._wait_weights, tuple(buckets))))

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups

    def group_of(self, p: torch.nn.Parameter):
        """The data-parallel group p's gradient is reduced over (and its state sharded over)."""
        return self.edp_group if self.ep_group is not None and _is_expert(p) else self.dp_group

    # ---- gradients ------------------------------------------------------------------------
    def begin_accumulation(self, backwards: int) -> None:
        """The step about to run will call backward this many times (its micro-batches on this
        rank): a bucket whose parameters all got their last gradient can then be reduced at once."""
        self._backwards = backwards

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        """p's gradient of one backward is complete: add it into the fp32 main gradients."""
        b, o = self.bucket_of[id(p)]
        g = p.grad.reshape(-1)  # (n,) in the weights' dtype
        p.grad = None
        self._arrive(b, o, g)

    def _arrive(self, b: Bucket, o: int, g: torch.Tensor | None) -> None:
        """One parameter of b is done with one backward: its gradient g (flat, at offset o; None:
        nothing to add, a deferred lookup's) added in, and b reduced once all of them are."""
        b.arrived += 1
        if b.grad is not None:
            if g is not None:
                b.grad[o:o + g.numel()].add_(g)
            # A parameter that got no gradient only delays the reduction to finish(): sums are linear.
            if self.overlap_grad and self._backwards and b.arrived == len(b.params) * self._backwards:
                self._start_reduction(b)
            return
        if b.staging is None:
            while len(self._inflight) >= MAX_STAGING_BUCKETS:  # bounded memory: the oldest first
                self._complete(*self._inflight.pop(0))
            b.staging = torch.zeros(b.numel, dtype=torch.float32, device=b.grad_shard.device)  # (numel,)
        if g is not None:
            b.staging[o:o + g.numel()].add_(g)
        if b.arrived == len(b.params):
            self._reduce_staging(b)

    # ---- the embedding lookup's gradient, gathered sparse ---------------------------------------
    def _defer_lookups(self, model: torch.nn.Module, tokens: int | None) -> None:
        """Route the token embedding's lookup gradient around autograd (DeferredLookup): the rows
        the batch touched travel instead of a (V, C) gradient (module docstring)."""
        emb = getattr(model, "tok_emb", None)
        if emb is None or self.dp == 1 or id(getattr(emb, "weight", None)) not in self.bucket_of:
            return
        p = emb.weight
        if tokens is None or not lookup_rows_travel(comm.size(self.bucket_of[id(p)][0].group), tokens,
                                                    p.shape[0]):
            return
        # tied on this stage: the head's use of the weight still reaches it through autograd, which
        # counts its arrival; else the lookup is its only use, and the lookup's gradient arrives
        others = [name for name, q in model.named_parameters(remove_duplicate=False)
                  if q is p and not name.startswith("tok_emb.")]
        self._lookup_only = not others
        sink = functools.partial(self._lookup_grad, p)
        # the graph's handle on the lookup: were the weight its input, autograd would accumulate the
        # head's gradient into a tied weight only after the lookup's backward, the last of all
        anchor = torch.zeros(0, device=p.device, requires_grad=True)

        def lookup(ids, weight):
            return DeferredLookup.apply(anchor, weight.detach(), ids, sink)
        if hasattr(emb, "lookup"):  # the vocab-parallel embedding: its local lookup
            emb.lookup = lookup
        else:  # torch's nn.Embedding (no padding_idx, max_norm: the model's)
            emb.forward = lambda ids: lookup(ids, emb.weight)
        self._deferred = emb

    def _lookup_grad(self, p: torch.nn.Parameter, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """DeferredLookup's backward: ids (...), grad (..., C) the lookup output's gradient."""
        b, o = self.bucket_of[id(p)]
        rows = grad.reshape(-1, p.shape[1])  # (N, C)
        ids = ids.reshape(-1)  # (N,)
        self._lookups += 1
        if self.stage >= 2 or (self._backwards and self._lookups == self._backwards):
            # this backward's gradient is reduced: gather the rows, add them to the reduced sum
            d, n = comm.size(b.group), ids.numel()
            all_ids = torch.empty(d * n, dtype=ids.dtype, device=ids.device)  # (d N,)
            all_rows = torch.empty(d * n * rows.shape[1], dtype=rows.dtype, device=rows.device)  # (d N C,)
            pending = (comm.all_gather_into_async(all_ids, ids, b.group),
                       comm.all_gather_into_async(all_rows, rows.contiguous(), b.group))
            self._gathered.append((b, o, p, pending, all_ids, all_rows))
            if self.stage >= 2 and not self._drain_queued:  # into the shard at the end of this
                # backward, after its reduce-scatters (with or without overlap: the same sums in order)
                self._drain_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        else:  # accumulating: into the main gradient, reduced with the rest
            b.grad[o:o + p.numel()].add_(_lookup_dense(rows, ids, p.shape[0]).reshape(-1))
        if self._lookup_only:
            self._arrive(b, o, None)

    def _add_lookups(self) -> None:
        """Wait for the gathered lookup gradients and add every rank's into the reduced (shard of
        the) gradient; stages 0-1 call it once the buckets' reductions are complete."""
        for b, o, p, pending, all_ids, all_rows in self._gathered:
            for work in pending:
                work.wait()
            rows = all_rows.view(all_ids.numel(), -1)  # (d N, C) every rank's, in rank order
            dense = _lookup_dense(rows, all_ids, p.shape[0]).reshape(-1)  # (V C,)
            lo, hi = max(o, b.lo), min(o + p.numel(), b.lo + b.shard_size)  # its part in this rank's shard
            if lo < hi:
                b.grad_shard[lo - b.lo:hi - b.lo].add_(dense[lo - o:hi - o])
        self._gathered.clear()

    def _start_reduction(self, b: Bucket) -> None:
        """Stages 0-1: the step's reduction of b's main gradients, started (finish() waits)."""
        b.launched = True
        if self.stage == 0:
            self._inflight.append((comm.all_reduce_async(b.grad, b.group), None))
        else:  # gloo sums into b.grad's own chunk, and its result is then b.grad_shard itself
            self._inflight.append((comm.reduce_scatter_async(b.grad, b.group), b.grad_shard))

    def _reduce_staging(self, b: Bucket, in_backward: bool = True) -> None:
        """Stages 2-3: one backward's gradients of b, reduce-scattered into its shard."""
        pending = comm.reduce_scatter_async(b.staging, b.group)  # (numel/d,) when done
        self._inflight.append((pending, b))
        b.staging, b.arrived = None, 0
        if b.sharded_weights:  # the backward is done with these weights (each parameter's last use
            b.release()        # comes before its gradient is accumulated)
        if not self.overlap_grad:
            self._complete(*self._inflight.pop())
        elif in_backward and not self._drain_queued:  # once per backward: the rest waits for its end
            self._drain_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._drain_queued = False
        while self._inflight:
            self._complete(*self._inflight.pop(0))
        self._add_lookups()  # stages 2-3: into the shard, as the reduce-scatters' results

    def _complete(self, pending: comm.Pending, into) -> None:
        """Wait for a started reduction and put its result where it belongs."""
        out = pending.wait()
        if isinstance(into, Bucket):  # stage 2-3: this backward's share, added to the shard
            into.grad_shard.add_(out)
        elif into is not None and out.data_ptr() != into.data_ptr():  # stage 1 (NCCL): the shard
            into.copy_(out)

    # ---- ZeRO-3: the weights just in time ---------------------------------------------------------
    def _before_forward(self, b: Bucket, module, args) -> None:
        b.gather(b.group)
        if not b.pending:  # (not a recomputation inside the backward)
            for nxt in self._neighbours.get((id(b), "forward"), ()):
                nxt.start_gather(nxt.group)  # arrives while this block computes

    def _after_forward(self, b: Bucket, module, args, output) -> None:
        # an embedding's backward never reads its weight (and the lookup's is deferred): gathering
        # the bucket again for it, at the very end of the backward, would only wait on the link
        if torch.is_grad_enabled() and not isinstance(module, (torch.nn.Embedding, VocabParallelEmbedding)):
            for t in _tensors(output):
                if t.requires_grad:  # its gradient arrives just before this module's backward
                    t.register_hook(functools.partial(self._before_backward, b))
        if not b.pending and not (b.hold_forward and torch.is_grad_enabled()):
            b.release()  # (a recomputation inside the backward leaves them held; so does a training
            # forward the embedding-and-head bucket, until its gradients are reduced, as FSDP's root)

    def _before_backward(self, b: Bucket, grad: torch.Tensor) -> None:
        b.pending = True
        b.gather(b.group)
        for prev in self._neighbours.get((id(b), "backward"), ()):
            prev.start_gather(prev.group)  # the block whose backward comes next

    # ---- ZeRO-1/2: the step's all-gather behind the next forward -----------------------------------
    def _wait_weights(self, buckets: tuple, module, args) -> None:
        for b in buckets:
            b.wait_gather()

    def settle(self) -> None:
        """Wait for every collective this optimizer has in flight (before reading the weights
        outside a forward, or leaving the process group)."""
        while self._inflight:
            self._complete(*self._inflight.pop(0))
        for b in self.buckets:
            b.wait_gather()

    def zero_grad(self, set_to_none: bool = True) -> None:
        while self._inflight:  # (a step abandoned mid-backward: let its collectives finish first)
            self._complete(*self._inflight.pop(0))
        for *_, pending, _ids, _rows in self._gathered:
            for work in pending:
                work.wait()
        self._gathered.clear()
        self._lookups = 0
        for b in self.buckets:
            (b.grad if b.grad is not None else b.grad_shard).zero_()
            b.staging, b.arrived, b.launched = None, 0, False
            for p in b.params:
                p.grad = None
        self._backwards = None

    def finish(self) -> None:
        """Steps 1-3 of the module docstring, on this rank's shard of the main gradients."""
        for b in self.buckets:  # start what the backward did not (all of it without overlap)
            if self.stage >= 2:
                if b.staging is not None:  # the part of the last backward still in staging
                    self._reduce_staging(b, in_backward=False)
                if b.sharded_weights:  # one a backward gathered but sent no gradient
                    b.release()
            elif self.dp > 1 and not b.launched:
                self._start_reduction(b)
        while self._inflight:
            self._complete(*self._inflight.pop(0))
        self._add_lookups()  # after the reductions: stages 0-1 reduce the buffer they add to
        self._backwards, self._lookups = None, 0
        for b in self.buckets:
            b.launched, b.arrived = False, 0
            if self.dp > 1:
                b.grad_shard.div_(self.dp)
        if self.tp_group is not None:
            _sum_views([f.master.grad for f in self._sp], self.tp_group)
        if self._tied is not None and self.embed_group is not None:
            _sum_views([f.master.grad for f in self.by_param.get(id(self._tied), [])], self.embed_group)

    def clip(self, max_norm: float) -> float:
        """Scale the finished gradients so the global norm is at most max_norm (0: no clipping);
        returns the norm before clipping; a non-finite norm leaves them unscaled."""
        sharded = self.stage >= 1
        dense, experts = self._norm_runs
        if experts is not None:  # shards over the expert-data-parallel group, experts over ep
            experts = (experts, self.edp_group if sharded else None, self.ep_group)
        norm = global_norm(dense, self.tp_group, self.pp_group,
                           shard_group=self.dp_group if sharded else None, experts=experts)
        if max_norm > 0 and math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                for b in self.buckets:
                    b.grad_shard.mul_(coef)
        return norm

    def checkpoint_view(self) -> dict:
        """The checkpoint reads and writes fp32 masters and moments through these accessors
        (collective over dp when sharded), so it stores whole tensors like every backend."""
        return {"get_param": self.get_param, "set_param": self.set_param, "get_state": self.get_state,
                "set_state": self.set_state}

    def finished_grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        """p's whole finished gradient (fp32) on this rank; collective over dp when sharded."""
        return self._gather(p, lambda f: f.master.grad).view(p.shape)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> None:
        """AdamW on this rank's masters, then every rank's updated shard into everyone's weights."""
        self.adamw.step()
        for b in reversed(self.buckets):  # forward order: the first needed is gathered first
            if b.weights.dtype != torch.float32:
                b.shard_weights.copy_(b.master)  # round the fp32 master to the compute dtype
            if self.stage in (1, 2):  # (ZeRO-3 gathers on use); in place: the shard is a view of it
                b.gathering = comm.all_gather_into_async(b.weights, b.shard_weights, b.group)
                if not self.overlap_param:
                    b.wait_gather()

    @contextlib.contextmanager
    def full_weights(self):
        """ZeRO-3: every bucket's full weights in place for the duration (to read the parameters
        outside a forward, e.g. in tests); a no-op for the other stages. Collective over dp."""
        self.settle()
        held = [b for b in self.buckets if not b.gathered]
        for b in held:
            b.gather(b.group)
        try:
            yield
        finally:
            for b in held:
                b.release()

    # ---- checkpoint accessors ---------------------------------------------------------------
    def _gather(self, p: torch.nn.Parameter, part) -> torch.Tensor:
        """A whole fp32 tensor of p from every rank's fragments (part(f) each), flat."""
        out = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)  # (n,)
        for f in self.by_param.get(id(p), []):
            out[f.lo:f.hi] = part(f)
        if self.stage >= 1:  # the fragments are disjoint: the sum assembles them
            comm.all_reduce(out, self.group_of(p))
        return out

    def get_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        """p's fp32 master (collective over dp when sharded)."""
        return self._gather(p, lambda f: f.master.detach()).view(p.shape)

    def set_param(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        self.settle()  # no gather may still be writing the weights
        flat = value.reshape(-1).to(device=p.device, dtype=torch.float32)
        with torch.no_grad():
            if self.stage != 3:  # the shard is a view of the weights: this writes it too
                p.copy_(value.to(p.device))
            for f in self.by_param.get(id(p), []):
                if self.stage == 3:  # only the shard exists between uses
                    f.bucket.shard_weights[f.shard_lo:f.shard_hi].copy_(flat[f.lo:f.hi])
                f.master.copy_(flat[f.lo:f.hi])

    def get_state(self, p: torch.nn.Parameter) -> dict | None:
        """p's AdamW moments (and step) assembled from the fragments; None before the first step."""
        steps = [self.adamw.state[f.master]["step"] for f in self.by_param.get(id(p), [])
                 if "step" in self.adamw.state.get(f.master, {})]
        n = p.numel()
        # exp_avg | exp_avg_sq | step | holders
        flat = torch.zeros(2 * n + 2, dtype=torch.float32, device=p.device)
        for f in self.by_param.get(id(p), []):
            st = self.adamw.state.get(f.master)
            if st:
                flat[f.lo:f.hi] = st["exp_avg"]
                flat[n + f.lo:n + f.hi] = st["exp_avg_sq"]
        if steps:
            flat[2 * n] = float(steps[0])
            flat[2 * n + 1] = 1.0
        if self.stage >= 1:
            comm.all_reduce(flat, self.group_of(p))
        if flat[2 * n + 1] == 0:
            return None
        step = (flat[2 * n] / flat[2 * n + 1]).cpu()  # every holder steps together: the same count
        return {"exp_avg": flat[:n].view(p.shape), "exp_avg_sq": flat[n:2 * n].view(p.shape), "step": step}

    def set_state(self, p: torch.nn.Parameter, st: dict) -> None:
        avg, sq = st["exp_avg"].reshape(-1), st["exp_avg_sq"].reshape(-1)
        for f in self.by_param.get(id(p), []):
            self.adamw.state[f.master] = {
                "step": torch.as_tensor(st["step"], dtype=torch.float32).clone().reshape(()),
                "exp_avg": avg[f.lo:f.hi].to(f.master.device).clone(),
                "exp_avg_sq": sq[f.lo:f.hi].to(f.master.device).clone()}

    # ---- accounting (benchmarks, tests) ------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the model state, by kind (distinct storages, padding included)."""
        weights = sum(b.shard_weights.numel() * b.shard_weights.element_size() if b.sharded_weights
                      else b.weights.numel() * b.weights.element_size() for b in self.buckets)
        grads = sum((b.grad if b.grad is not None else b.grad_shard).numel() * 4 for b in self.buckets)
        master = sum(b.master.numel() * 4 for b in self.buckets if b.weights.dtype != torch.float32)
        moments = sum(t.numel() * t.element_size() for st in self.adamw.state.values()
                      for k, t in st.items() if k != "step")
        return {"weights": weights, "grads": grads, "master": master, "moments": moments}


class DeferredLookup(torch.autograd.Function):
    """F.embedding(ids, weight) whose weight gradient autograd never forms: the backward hands the
    output's gradient (the rows the batch touched) and the ids to `sink` (the optimizer), which
    either adds them in at once or gathers them over the data-parallel group (module docstring).
    The weight comes detached; `anchor` (an empty leaf that requires grad) keeps the lookup in the
    graph."""

    @staticmethod
    def forward(ctx, anchor, weight, ids, sink):
        ctx.save_for_backward(ids)
        ctx.sink = sink
        return torch.nn.functional.embedding(ids, weight)  # (..., C)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        ctx.sink(ids, grad)
        return None, None, None, None


def _lookup_dense(rows: torch.Tensor, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows, C) fp32: the rows (N, C) summed into their ids' rows, as the embedding's backward
    (deterministic on every device, unlike index_add_ on CUDA)."""
    return torch.ops.aten.embedding_dense_backward(rows.float(), ids, num_rows, -1, False)


def _units(model: torch.nn.Module, params: list[torch.nn.Parameter], tied):
    """ZeRO-3's buckets (parameter runs in `params`' order) and, for each, the modules whose forward
    uses them: one per transformer block; the rest of the stage (embeddings, final norm, head: the
    leaf modules owning those parameters); a pipeline stage's tied-embedding copy on its own."""
    blocks = list(getattr(model, "blocks", {}).values())
    in_block = {id(p) for blk in blocks for p in blk.parameters()}
    order = {id(p): i for i, p in enumerate(params)}
    runs = [sorted((p for p in blk.parameters() if id(p) in order), key=lambda p: order[id(p)])
            for blk in blocks]
    users: list[list[torch.nn.Module]] = [[blk] for blk in blocks]
    runs, users = [r for r in runs if r], [u for r, u in zip(runs, users, strict=True) if r]
    rest = [p for p in params if id(p) not in in_block and p is not tied]
    for group in ([rest, [tied]] if tied is not None else [rest]):
        ids = {id(p) for p in group}
        if group:
            runs.append(group)
            users.append([m for m in model.modules()
                          if any(id(q) in ids for q in m.parameters(recurse=False))])
    return runs, users


def lookup_rows_travel(group_size: int, tokens: int, table_rows: int) -> bool:
    """Whether the embedding lookup's gradient travels as rows (DeferredLookup): when the rows every
    rank of the group gathers, group_size x the tokens of its micro-batch, are fewer than the rows of
    the (local shard of the) table, whose dense gradient would be reduced instead. Every rank decides
    alike: the micro-batches of one step have one shape on every rank."""
    return group_size * tokens < table_rows


def grad_runs(fragments: list[Fragment]) -> list[GradRun]:
    """Adjacent fragments of one bucket with the same tensor-parallel tag as one view of the bucket's
    gradient shard: the global norm then takes a few long reductions per bucket instead of one
    (and a Python round trip) per parameter."""
    runs: list[tuple[Fragment, int]] = []  # (first fragment, end in its bucket's shard)
    for f in fragments:
        tp = getattr(f.param, "tensor_parallel", False)
        if runs and runs[-1][0].bucket is f.bucket and runs[-1][1] == f.shard_lo and \
                getattr(runs[-1][0].param, "tensor_parallel", False) == tp:
            runs[-1] = (runs[-1][0], f.shard_hi)
        else:
            runs.append((f, f.shard_hi))
    return [GradRun(f.bucket.grad_shard[f.shard_lo:end], getattr(f.param, "tensor_parallel", False))
            for f, end in runs]


def _is_expert(p: torch.nn.Parameter) -> bool:
    return getattr(p, "expert_parallel", False)


def _by_group(run: list[torch.nn.Parameter], experts: bool) -> list[list[torch.nn.Parameter]]:
    """A run of parameters split into its dense and (under expert parallelism) expert parameters."""
    if not experts:
        return [run]
    return [[p for p in run if not _is_expert(p)], [p for p in run if _is_expert(p)]]


def _block_neighbours(model: torch.nn.Module, buckets: list[Bucket], users) -> dict:
    """ZeRO-3 prefetch: (id(bucket), "forward") -> the buckets of the block that runs next in the
    forward, (id(bucket), "backward") -> those whose backward comes next; only between blocks of
    one contiguous run of layers (a pipeline chunk), whose order is certain."""
    blocks = getattr(model, "blocks", {})
    of_block: dict[int, list[Bucket]] = {}
    for b, mods in zip(buckets, users, strict=True):
        if len(mods) == 1 and b.sharded_weights:
            of_block.setdefault(id(mods[0]), []).append(b)
    out = {}
    for key, blk in blocks.items():
        nxt = blocks[str(int(key) + 1)] if str(int(key) + 1) in blocks else None
        if nxt is not None and id(blk) in of_block and id(nxt) in of_block:
            for b in of_block[id(blk)]:
                out[(id(b), "forward")] = of_block[id(nxt)]
            for b in of_block[id(nxt)]:
                out[(id(b), "backward")] = of_block[id(blk)]
    return out


def _tensors(output):
    """The tensors in a module's output (a tensor, or a tuple / list holding some)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    return []


def _sum_views(views: list[torch.Tensor], group) -> None:
    """All-reduce several views in one flat message, written back in place."""
    if not views or comm.size(group) == 1:
        return
    flat = torch.cat([v.reshape(-1) for v in views])
    comm.all_reduce(flat, group)
    for v, new in zip(views, flat.split([v.numel() for v in views]), strict=True):
        v.copy_(new.view_as(v))
