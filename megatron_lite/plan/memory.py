"""Peak memory per rank (bytes): what THIS code holds, term by term; the peak of the fullest rank
over three moments: building the model, the forward/backward of a step (before the first backward
of a step, or after it: gradients exist), and the optimizer step.

  weights     this rank's parameters (stage.rank_params: a meta-device GPT of the stage's pieces,
              sliced by the TP table, so the vocabulary is padded exactly when parallelize() pads it
              and the last stage holds its copy of a tied embedding) in the compute dtype: the
              native backends keep them in the distributed optimizer's flat buckets (bf16 under
              train.precision=bf16, padded to a multiple of dp when sharded; ZeRO-3: this rank's 1/dp
              shard of each bucket, one per block); DeepSpeed bf16 holds
              the module in bf16 (x2), fp32 otherwise (x4)
  grads       fp32 main gradients: the whole buckets (ZeRO 0 and 1), this rank's 1/dp shard of each
              (ZeRO-2 and -3); fp32 with dp = 1 (PlainAdamW) param.grad; DeepSpeed stage 2/3 keep their
              partition and a reduce bucket
  optimizer   AdamW exp_avg + exp_avg_sq (8 bytes per element this rank steps) + the fp32 master
              weights under bf16 (4 bytes; fp32 weights are their own master): all of the buckets
              without ZeRO, this rank's 1/dp shard of each with ZeRO-1/2; DeepSpeed: its fp32
              master partition (4/dp) + moments (8/dp)
  activations what autograd saves per block, model/activations.saved_terms (the one count, equal to
              saved_tensors_hooks in tests), times the peak number of micro-batch chunks in flight
              on the stage from the schedule simulator (pipeline/schedules.simulate: 1F1B p on stage
              0, GPipe m, interleaved its own count); full recompute keeps each block's input plus one
              block's whole set while it is recomputed; the head (final norm as saved_terms counts a
              block's norm; at tp=1 the fused linear + cross-entropy keeps grad_x and grad_w; at tp>1
              the linear's input, a sequence shard under SP, and the fp32 softmax over the padded
              vocabulary slice)
  pipeline    the message buffers the engine holds at once (chunk outputs until their send's
              release, when the engine frees a sent output still awaiting its backward; posted
              receives; gradients until their send is released; pipeline/schedules.held_messages
              walks the stage's list as the engine keeps them: flat in m for 1F1B and
              interleaving, m + 2 for GPipe, whose forward sends are known received only once the
              first gradient comes back) x b x s (/tp under SP) x h x the
              engine's message dtype (the compute dtype; fp32 under DeepSpeed)
  transient   the largest short-lived buffer at the peak: a chunk of logits (fused CE) or the
              vocab-parallel logits and their fp32 copy, the block recomputed under full recompute,
              ZeRO-2's fp32 staging buckets (during a backward: the one filling and, with
              parallel.overlap_grad_reduce, the one still reducing; none past its end), ZeRO-3's
              gathered buckets (the largest in a forward; a block's and the next one's, with their
              fp32 staging, in a backward, plus the embedding + head bucket when one stage holds
              both), the optimizer step's temporaries (the reduce-scatter's shard-sized outputs on
              NCCL, where gloo reduces in place; AdamW's per-tensor temporaries; the flat output
              gloo's all_gather allocates inside, where NCCL gathers straight into the weights), or
              what building the model holds (the stage's fp32 shards, built on the meta device and
              materialised one parameter at a time from its full value on the host; the
              distributed optimizer's fp32 copy of a bucket)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import Config, ModelConfig
from ..layout import Layout
from ..model.activations import saved_terms
from ..slicing import padded_vocab
from .stage import MAX_STAGING_BUCKETS, chunks_of, rank_params, schedule_facts, stage_params

# The norm terms of saved_terms (a block has two norms: ln1, ln2; the head has one, ln_f).
NORM_TERMS = ("norm inputs (ln1, ln2)", "norm statistics")


@dataclass
class Memory:
    """Peak bytes on the fullest rank, by kind."""
    stage: int
    weights: float
    grads: float  # fp32 main gradients (or their shard), at the moment of the peak (0 before a backward)
    optimizer: float  # fp32 masters (bf16) + AdamW moments
    activations: float  # saved tensors of the in-flight micro-batches (saved_terms x schedule)
    pipeline: float  # message buffers the engine holds at its peak (schedules.held_messages)
    transient: float  # the largest short-lived buffer at the peak (logits, recompute, staging, step, build)
    total: float
    phase: str = "step"  # where the peak is: "build", "forward" (before a backward), "backward",
    # "reduce" (ZeRO-2 reducing a staging bucket), "step"
    build: float = 0.0  # bytes while the model is built (total = the larger of it and the training peak)

    def as_dict(self) -> dict:
        return {k: (round(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def dtype_bytes(cfg: Config) -> int:
    """Bytes of the compute dtype (weights, activations, pipeline messages, TP collectives)."""
    return 2 if cfg.train.precision == "bf16" else 4


def block_activations(mc: ModelConfig, tp: int, sp: bool, b: int, s: int, e: int, device: str,
                      recompute: str) -> tuple[int, int]:
    """(bytes one block keeps per micro-batch on one tp rank under `recompute`, bytes of its whole set
    without recompute): model/activations.saved_terms, summed."""
    kept = sum(saved_terms(mc, b, s, tp, sp, e=e, recompute=recompute, device=device).values())
    whole = sum(saved_terms(mc, b, s, tp, sp, e=e, recompute="none", device=device).values())
    return kept, whole


def head_activations(mc: ModelConfig, tp: int, sp: bool, b: int, s: int, e: int, device: str,
                     vocab: int) -> tuple[float, float, float]:
    """(bytes the head keeps per micro-batch, its forward's transient, its backward's transient) on one
    tp rank; vocab is this rank's (padded) slice. The final norm keeps what one of a block's two norms
    does (saved_terms, without recompute: ln_f is never recomputed)."""
    N, h = b * s, mc.hidden_size
    terms = saved_terms(mc, b, s, tp, sp, e=e, recompute="none", device=device)
    norm = sum(terms[k] for k in NORM_TERMS) / 2
    if tp == 1 and mc.norm_saves_output:  # a block's norm output is its GEMM's saved input; the fused
        norm += N * h * e                 # loss below keeps grad_x instead, so ln_f's output is extra
    if tp == 1:
        # model/loss.py: grad_x (N, h) and grad_w (V, h) computed in the forward and saved (grad_w
        # accumulated in fp32, saved in the weights' dtype); per chunk of 1024 rows the logits in the
        # compute dtype, their fp32 copy, logsumexp's temporary, the probabilities cast back
        saved = norm + N * h * e + vocab * h * e
        chunk = min(1024, N) * vocab * 4 * 2
        forward = chunk + (vocab * h * 4 if e != 4 else 0)  # the fp32 accumulator of grad_w
        return saved, forward, vocab * h * e  # backward: grad_w x grad_out
    # vocab-parallel head: the linear's input (the sequence shard under SP: gather_linear), the fp32
    # softmax over this rank's slice and three per-token vectors (int64 label, two bool masks)
    rows = N // tp if sp else N
    saved = norm + rows * h * e + N * vocab * 4 + N * 10
    return saved, N * vocab * (e + 4), N * vocab * (4 + e)  # logits + fp32 copy; backward: grad + cast


# ---- model state -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class State:
    """What one rank holds for the model state and what its optimizer allocates around it."""
    weights: float
    grads: float  # the persistent (main) gradients
    optimizer: float  # masters + moments
    staging: float  # ZeRO-2: the fp32 bucket a backward's gradients pass through (0 otherwise)
    reduce: float  # ZeRO-2: what reducing a full staging bucket holds (it, the reduce-scatter's buffers)
    step_transient: float  # the largest temporary of finish/clip/step
    build_transient: float  # the largest temporary while the optimizer is built (beside weights)
    grads_kept: bool = False  # the gradients outlive the step (main-gradient buffers zeroed in place)
    # ZeRO-3: full weights gathered only around a forward / a backward (the largest bucket in a
    # forward; in a backward a block's plus the stage's "rest" bucket while its gradients arrive)
    gathered_forward: float = 0.0
    gathered_backward: float = 0.0


def buckets(layout: Layout, stage: int) -> list[int]:
    """Elements of each of the distributed optimizer's buckets on a rank of `stage`, before padding,
    as optim/distributed.py cuts them: parameters in reverse module order (about the order backward
    finishes them) in runs of at most optim.zero.bucket_elements, the tied embedding's copy (pp > 1)
    in a bucket of its own."""
    mc = layout.config.model
    sizes = list(rank_params(layout, stage).sizes)[::-1]
    chunks = chunks_of(layout, stage)
    embed, head = any(c.first for c in chunks), any(c.last for c in chunks)
    tied = None
    if layout.pp > 1 and mc.tie_embeddings and embed != head:
        # the embedding is first in module order (last here), the head's copy last (first here)
        tied = sizes.pop(-1 if embed else 0)
    limit = layout.config.optim.zero.bucket_elements
    runs, size = [], 0
    for n in sizes:
        if runs and size and size + n > limit:
            runs.append(0)
            size = 0
        if not runs:
            runs.append(0)
        runs[-1] += n
        size += n
    return runs + ([tied] if tied is not None else [])


def zero3_buckets(layout: Layout, stage: int) -> tuple[list[int], int, int]:
    """ZeRO-3's buckets on a rank of `stage` as optim/distributed.py cuts them: one per block, one
    for the rest (embeddings, final norm, head), the tied embedding's copy (pp > 1) apart; returns
    (bucket sizes, one block's size, the rest's size)."""
    mc = layout.config.model
    params = rank_params(layout, stage)
    chunks = chunks_of(layout, stage)
    layers = sum(len(c.layers) for c in chunks)
    embed, head = any(c.first for c in chunks), any(c.last for c in chunks)
    block = stage_params(mc, 1, False, False, layout.tp, layout.config.parallel.make_vocab_divisible_by).total
    # pp > 1 with tied embeddings: the first stage's embedding and the last stage's copy alone
    tied = params.sizes[0 if embed else -1] if layout.pp > 1 and mc.tie_embeddings and embed != head else 0
    rest = params.total - layers * block - tied
    return [block] * layers + [n for n in (rest, tied) if n], block, rest


def _shard(numel: int, shards: int, index: int) -> tuple[int, int]:
    """(padded shard size, elements of the parameters in shard `index`) of a bucket of numel."""
    size = -(-numel // shards)
    return size, max(0, min(numel, (index + 1) * size) - index * size)


def model_state(layout: Layout, stage: int, dp_rank: int = 0, device: str = "cuda") -> State:
    """The model state of the rank at (stage, dp_rank), as the backend allocates it."""
    cfg = layout.config
    z, dp = cfg.optim.zero, layout.dp
    bf16 = cfg.train.precision == "bf16"
    params = rank_params(layout, stage)
    n = params.total
    cpu = device == "cpu"
    if layout.backend == "deepspeed":
        weights = n * (2 if bf16 else 4) / (dp if z.stage == 3 else 1)
        optimizer = 12 * n / dp  # fp32 master partition + exp_avg + exp_avg_sq
        if z.stage == 1:
            grads, staging = 4 * n, 0.0  # param.grad in full until the step's reduction
        else:
            bucket = min(5e8, n) * 4 if z.stage == 2 else 0  # reduce bucket (DeepSpeed default)
            grads, staging = (2 if z.stage == 3 else 1) * 4 * n / dp + bucket, 0.0
        return State(weights, grads, optimizer, staging, 0.0, 4 * max(params.sizes), 0.0)
    if not bf16 and dp == 1:  # PlainAdamW (make_optimizer): param.grad, torch's AdamW (foreach off CPU)
        step = 2 * max(params.sizes) * 4 if cpu else 4 * n
        return State(4 * n, 4 * n, 8 * n, 0.0, 0.0, step, 0.0)
    # optim/distributed.py: flat buckets of the compute dtype, fp32 main grads, fp32 masters + moments
    e = 2 if bf16 else 4
    stage_z = z.stage if dp > 1 else 0
    shards = dp if stage_z >= 1 else 1
    index = dp_rank if shards > 1 else 0
    runs = zero3_buckets(layout, stage)[0] if stage_z == 3 else buckets(layout, stage)
    padded = [_shard(nb, shards, index)[0] * shards for nb in runs]
    owned = [_shard(nb, shards, index)[1] for nb in runs]  # elements this rank steps (no padding)
    weights = e * sum(padded)
    grads = 4 * (sum(padded) if stage_z < 2 else sum(p // shards for p in padded))
    master = 4 * sum(p // shards for p in padded) if bf16 else 0
    optimizer = master + 8 * sum(owned)
    biggest = max(padded)
    overlap = cfg.parallel.overlap_grad_reduce
    # ZeRO-2: the staging bucket filling and (overlap_grad_reduce) the previous one still reducing:
    # optim/distributed.py keeps at most MAX_STAGING_BUCKETS alive, the filling one included
    pair = sorted(padded)[-MAX_STAGING_BUCKETS:] if overlap else [biggest]
    staging = 4 * sum(pair) if stage_z == 2 else 0.0
    fwd_gather = bwd_gather = 0.0
    if stage_z == 3:  # the weights' shards persist; full buckets only around their use
        weights /= shards
        _, block, rest = zero3_buckets(layout, stage)
        chunks = chunks_of(layout, stage)
        # with the embedding and the head on one stage the rest bucket is gathered (and its fp32
        # staging alive) from the head's backward to the embedding's, across every block's backward
        whole = rest if any(c.first for c in chunks) and any(c.last for c in chunks) else 0
        block_p = _shard(block, shards, index)[0] * shards if block else 0
        # parallel.overlap_param_gather prefetches one block ahead: the block in use and the next
        # one's gathered weights are alive together, in a forward and in a backward
        ahead = block_p if cfg.parallel.overlap_param_gather else 0
        fwd_gather = e * (biggest + ahead)
        bwd_gather = e * (block_p + ahead + whole)
        # the bucket filling (a block's, or the rest's when it is not held across the blocks) and,
        # overlapped, the block before it still reducing; the rest's own staging beside them
        staging = 4 * (max(block_p, biggest if not whole else 0)
                       + (MAX_STAGING_BUCKETS - 1) * block_p * overlap + whole)
    # reducing them: gloo has no reduce-scatter, comm.reduce_scatter_async all-reduces the staging
    # bucket in place (its result a view of it); NCCL's reduce_scatter_tensor writes a new shard
    reduce = staging * (1 if cpu else 1 + 1 / shards)
    # finish (ZeRO-1): the main-gradient buffer reduce-scattered in place on gloo; NCCL's shard-sized
    # outputs, all of the step's alive until finish() copies them in when overlapped (one otherwise);
    # step: AdamW's temporaries per fragment (CPU, single-tensor) or over all of them (foreach),
    # then the all-gather of the updated shards, in place into the weights on NCCL; gloo's
    # all_gather (a list of outputs) gathers into a flat buffer of its own and copies out of it
    scatter = 0.0 if stage_z != 1 or cpu else 4 * (sum(padded) if overlap else biggest) / shards
    adam = 2 * 4 * min(max(params.sizes), max(owned)) if cpu else 4 * sum(owned)
    gather = e * biggest if stage_z in (1, 2) and cpu else 0.0  # (ZeRO-3 gathers on use)
    # construction: a bucket's fp32 values and its compute-dtype buffer beside the module's fp32
    # parameters (dropped as each bucket takes them over)
    build = (4 + (e if bf16 else 0)) * biggest
    return State(weights, grads, optimizer, staging, reduce, max(scatter, adam, gather), build,
                 grads_kept=True, gathered_forward=fwd_gather, gathered_backward=bwd_gather)


def build_peak(layout: Layout, stage: int, state: State, device: str = "cuda") -> float:
    """Bytes while the model is built: the stage's tensor-parallel shards in fp32 (build_stage: meta
    device, then each parameter's full master value drawn on the host and sliced; on CPU that full
    value and the padded copy slicing may make of it sit beside the shards), then the optimizer taking
    the fp32 parameters over bucket by bucket."""
    cfg = layout.config
    chunks = chunks_of(layout, stage)
    n = rank_params(layout, stage).total
    serial = stage_params(cfg.model, sum(len(c.layers) for c in chunks), any(c.first for c in chunks),
                          any(c.last for c in chunks), 1, cfg.parallel.make_vocab_divisible_by)
    one_full = 2 * 4 * max(serial.sizes, default=0) if device == "cpu" else 0.0
    return 4 * n + max(one_full, state.build_transient)


def peak_memory(layout: Layout, device: str = "cuda") -> Memory:
    """Peak memory of the fullest rank of `layout` (bytes), as this code allocates it (dp rank 0
    holds the most: the last shard of a bucket carries its padding)."""
    return max((memory_of(layout, stage, 0, device) for stage in range(layout.pp)), key=lambda mem: mem.total)


def memory_of(layout: Layout, stage: int, dp_rank: int = 0, device: str = "cuda") -> Memory:
    """Peak memory of the rank at pipeline stage `stage` and data-parallel index `dp_rank` (every tp
    rank holds the same amount)."""
    cfg = layout.config
    mc, p = cfg.model, cfg.parallel
    tp, pp, m = layout.tp, layout.pp, layout.micro_batches
    b, s, h = cfg.data.micro_batch_size, cfg.seq_length, mc.hidden_size
    e = dtype_bytes(cfg)
    sp = layout.sequence_parallel
    rc = cfg.train.recompute
    ds = layout.backend == "deepspeed"
    vocab = padded_vocab(mc.vocab_size, tp, p.make_vocab_divisible_by) // tp
    facts = schedule_facts(p.schedule, pp, m, p.virtual_stages, 2.0) if pp > 1 else None
    per_block, whole_block = block_activations(mc, tp, sp, b, s, e, device, rc)
    chunks = chunks_of(layout, stage)
    head = any(c.last for c in chunks)
    st = model_state(layout, stage, dp_rank, device)
    # activations: blocks of the in-flight chunk-micro-batches (the simulator's peak count), and
    # that count once the first backward has allocated the gradients
    inflight = facts.peak[stage] if facts else 1
    inflight_g = facts.peak_after_backward[stage] if facts else (1 if m > 1 else 0)
    per_mb = max(len(c.layers) for c in chunks) * per_block
    fwd_t = bwd_t = whole_block if rc == "full" else 0.0  # one block recomputed during backward
    if head:
        head_inflight = m if p.schedule == "gpipe" and pp > 1 else 1
        head_saved, head_fwd, head_bwd = head_activations(mc, tp, sp, b, s, e, device, vocab)
        fwd_t, bwd_t = max(fwd_t, head_fwd), max(bwd_t, head_bwd)
    else:
        head_saved = head_inflight = 0
    msg = 4 if ds else e
    pipeline = facts.held[stage] * b * (s // tp if sp else s) * h * msg if facts else 0.0
    # before the first backward no gradient exists; after it, all of them (accumulated in place)
    before = inflight * per_mb + head_inflight * head_saved
    after = inflight_g * per_mb + min(head_inflight, max(inflight_g, 1)) * head_saved
    state = st.weights + st.optimizer
    phases = [  # (name, grads, activations, pipeline, transient)
        ("forward", st.grads if st.grads_kept else 0.0, before, pipeline, fwd_t + st.gathered_forward),
        # ZeRO-2's staging bucket lives from a backward's first gradient to its reduction: not
        # while the head's forward runs
        ("backward", st.grads, after, pipeline,
         max(bwd_t + st.staging + st.gathered_backward, fwd_t + st.gathered_forward if inflight_g else 0.0)),
        # a bucket reduced once its last gradient arrived: the micro-batch whose backward
        # finished it holds no activations any more, the other in-flight ones still do
        ("reduce", st.grads, max(inflight_g - 1, 0) * per_mb, pipeline, st.reduce),
        ("step", st.grads, 0.0, 0.0, st.step_transient),
    ]
    name, grads, acts, held, transient = max(phases, key=lambda ph: sum(ph[1:]))
    total = state + grads + acts + held + transient
    build = build_peak(layout, stage, st, device)
    # the terms are the training peak's; building can be larger (fp32 shards before the optimizer
    # turns them into bf16 buckets), and then it is the total
    return Memory(stage, st.weights, grads, st.optimizer, acts, held, transient, max(total, build),
                  "build" if build > total else name, build)
