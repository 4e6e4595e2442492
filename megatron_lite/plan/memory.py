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
  (every "dp" of the optimizer terms is dp x cp: the cp ranks of a replica hold the same weights, and
  the distributed optimizer reduces and shards over the dp x cp group, train/backends.build_backend)
  optimizer   AdamW exp_avg + exp_avg_sq (8 bytes per element this rank steps) + the fp32 master
              weights under bf16 (4 bytes; fp32 weights are their own master): all of the buckets
              without ZeRO, this rank's 1/dp shard of each with ZeRO-1/2; DeepSpeed: its fp32
              master partition (4/dp) + moments (8/dp)
  activations what autograd saves per block, model/activations.saved_terms (the one count, equal to
              saved_tensors_hooks in tests) at the rank's T/cp tokens plus context parallelism's own
              (context_terms), times the peak number of micro-batch chunks in flight
              on the stage from the schedule simulator (pipeline/schedules.simulate: 1F1B p on stage
              0, GPipe m, interleaved its own count); full recompute keeps each block's input plus one
              block's whole set while it is recomputed; the head (final norm as saved_terms counts a
              block's norm; at tp=1 the fused linear + cross-entropy keeps grad_x and grad_w; at tp>1
              the linear's input, a sequence shard under SP, and the fp32 softmax over the padded
              vocabulary slice); an attention mask: with packed documents (any cp) one additive
              float tensor per chunk-forward (attention_mask_bytes: GPT.run builds it after the
              embedding and every block of the chunk keeps that same storage), so one per in-flight
              chunk-micro-batch, and under cp every micro-batch of the step also carries its
              (B, 1, T/cp, T) bool mask from the moment the trainer shards the global batch
              (train/trainer.next_batches builds all m of them first) until forward_backward
              returns; under cp without documents one (1, 1, T/cp, T) bool mask and its additive
              form for the whole run (parallel/context_parallel.ContextSharder), whatever is in
              flight (mask_bytes)
  pipeline    the message buffers the engine holds at once (chunk outputs until their send's
              release, when the engine frees a sent output still awaiting its backward; posted
              receives; gradients until their send is released; pipeline/schedules.held_messages
              walks the stage's list as the engine keeps them: flat in m for 1F1B and
              interleaving, m + 2 for GPipe, whose forward sends are known received only once the
              first gradient comes back) x b x s/cp (/tp under SP) x h x the
              engine's message dtype (the compute dtype; fp32 under DeepSpeed)
  transient   the largest short-lived buffer at the peak: a chunk of logits (fused CE) or the
              vocab-parallel logits and their fp32 copy, the block recomputed under full recompute,
              ZeRO-2's fp32 staging buckets (during a backward: the one filling and, with
              parallel.overlap_grad_reduce, the one still reducing; none past its end), ZeRO-3's
              gathered buckets (the largest in a forward; a block's and the next one's, with their
              fp32 staging, in a backward, plus the embedding + head bucket when one stage holds
              both), the optimizer step's temporaries (the reduce-scatter's buffers: NCCL's
              shard-sized outputs, gloo's chunks received from each other rank; AdamW's
              temporaries, none when fused; the flat output gloo's all_gather allocates inside,
              where NCCL gathers straight into the weights), ring
              attention's fp32 score-sized temporaries (context_transients), the bool temporaries
              of building a chunk-forward's document mask (mask_build_transient), or
              what building the model holds (the stage's fp32 shards, built on the meta device and
              materialised one parameter at a time from its full value on the host; the
              distributed optimizer's fp32 copy of a bucket)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import Config, ModelConfig
from ..layout import Layout
from ..model.activations import saved_terms
from ..model.loss import HEAD_PAD
from ..optim.adamw import fused_adamw
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


def context_terms(mc: ModelConfig, b: int, s: int, tp: int, cp: int, algorithm: str,
                  e: int) -> dict[str, int]:
    """Bytes one block keeps per micro-batch on one rank under context parallelism besides what
    saved_terms counts at its T/cp tokens (parallel/context_parallel.py; measured against
    saved_tensors_hooks in tests/unit/test_plan.py). s is the whole sequence T; each rank holds
    T/cp queries. Both algorithms also keep the chunk-forward's additive mask, the same storage in
    every block (attention_mask_bytes, counted once per in-flight chunk, not here).

      allgather  SDPA keeps the gathered K and V (all T keys: K heads each, cheap with GQA)
      ring       nothing more: RingAttention keeps what SDPA keeps (saved_terms): q, k, v as views into
                 the fused qkv output, its output laid out as SDPA's (the output projection's input
                 a view of it) and the fp32 log-sum-exp"""
    if cp == 1 or algorithm != "allgather":
        return {}
    K, D = mc.num_kv_heads // tp, mc.head_dim
    return {"gathered k, v (all T keys)": 2 * b * K * s * D * e}


def attention_mask_bytes(b: int, s: int, cp: int, e: int, docs: bool) -> int:
    """The additive float mask (0 / -inf, in the activations' dtype: e bytes) one chunk-forward builds
    (GPT.run / GPT.forward, after the embedding: Documents.attention or ContextShard.attention), which
    every block of that chunk hands to its attention and keeps for its backward: SDPA (cp = 1 with
    data.document_mask; allgather) and RingAttention save that same storage, full recompute's
    checkpoint holds the Attend it recomputes with (no second mask). (B, 1, T/cp, T) with
    data.document_mask (each sample its own documents), else (1, 1, T/cp, T) under cp; none at cp = 1
    without documents (SDPA's is_causal). With documents each pipeline chunk's forward builds its
    own, held from that forward until its backward; under cp without documents the rank's one shared
    shard keeps it, built once (mask_bytes). (DeepSpeed's autocast would convert it in every layer,
    but its bf16 casts the parameters, so the embedding's output and the mask are bf16 already, and
    Layout refuses it with pp > 1, where a chunk's input would be the engine's fp32 message.)"""
    if cp == 1 and not docs:
        return 0
    return (b if docs else 1) * (s // cp) * s * e


def mask_build_transient(b: int, s: int, cp: int, docs: bool) -> int:
    """Bytes of the bool temporaries beside the additive mask while a chunk-forward builds it: the
    inverted mask (additive_mask's ~allowed); at cp = 1 also Documents.attention's same-document and
    allowed masks (the ContextShard's bool mask is the micro-batch's, mask_bytes). None under cp
    without documents: the shared mask is built once, in the first forward, before any block's
    activations exist."""
    if not docs:
        return 0
    return attention_mask_bytes(b, s, cp, 1, docs) * (3 if cp == 1 else 1)


def context_transients(mc: ModelConfig, b: int, s: int, tp: int, cp: int, algorithm: str,
                       e: int) -> tuple[float, float]:
    """(forward, backward) bytes of context parallelism's largest short-lived tensors in one block.
    ring: its blocks are computed by plain matmuls in at least fp32 (context_parallel._probs), so
    score-sized (B, H, T/cp, T/cp) tensors live during each step: in the forward the scores, their
    difference to the log-sum-exp and its exp, beside the previous step's probabilities (4); in the
    backward the same three beside the previous step's probabilities and dS (5). allgather: the
    backward's gathered dK, dV before their reduce-scatter."""
    if cp == 1:
        return 0.0, 0.0
    H, K, D, local = mc.num_attention_heads // tp, mc.num_kv_heads // tp, mc.head_dim, s // cp
    if algorithm == "allgather":
        return 0.0, 2 * b * K * s * D * e
    score = b * H * local * local * max(e, 4)  # _wide: fp32 for bf16 and fp32 inputs
    return 4 * score, 5 * score


def mask_bytes(layout: Layout) -> float:
    """The masks a rank holds under context parallelism besides the blocks' (ContextShard). With
    data.document_mask: each micro-batch's (B, 1, T/cp, T) bool mask; every micro-batch is sharded,
    mask included, before the step runs (train/trainer.next_batches), so all m are held through the
    forward and backward. Without: ContextSharder's one shared shard, its (1, 1, T/cp, T) bool mask
    and additive mask (attention_mask_bytes), held for the whole run (shared_masks)."""
    cp = layout.cp
    if cp == 1:
        return 0.0
    cfg = layout.config
    s = cfg.seq_length
    if not cfg.data.document_mask:
        return (s // cp) * s * (1 + dtype_bytes(cfg))
    return layout.micro_batches * cfg.data.micro_batch_size * (s // cp) * s


def shared_masks(layout: Layout) -> bool:
    """One mask for every micro-batch and forward of the run (cp without packed documents)."""
    return layout.cp > 1 and not layout.config.data.document_mask


def block_activations(mc: ModelConfig, tp: int, sp: bool, b: int, s: int, e: int, device: str,
                      recompute: str, cp: int = 1, algorithm: str = "allgather",
                      layer: int = 0) -> tuple[int, int]:
    """(bytes one block keeps per micro-batch on one tp rank under `recompute`, bytes of its whole set
    without recompute): model/activations.saved_terms at the rank's s/cp tokens, summed, plus
    context_terms (full recompute keeps only the block's input: the gathered keys are made again when
    the block is recomputed). The chunk's shared attention mask is not a block's (attention_mask_bytes).
    `layer` decides whether the block is a MoE one (model.moe.layer_freq)."""
    local = s // cp
    extra = sum(context_terms(mc, b, s, tp, cp, algorithm, e).values())

    def terms(mode: str) -> int:
        return sum(saved_terms(mc, b, local, tp, sp, e=e, recompute=mode, device=device,
                               layer=layer).values())
    kept, whole = terms(recompute), terms("none") + extra
    return kept + (extra if recompute != "full" else 0), whole


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
        # compute dtype, their fp32 copy, logsumexp's temporary, the probabilities cast back; on CUDA
        # over the vocabulary rounded up to HEAD_PAD, with the weight's zero-padded copy beside them
        vp = -(-vocab // HEAD_PAD) * HEAD_PAD if device == "cuda" else vocab
        saved = norm + N * h * e + vocab * h * e
        chunk = min(1024, N) * vp * 4 * 2
        forward = chunk + (vp * h * 4 if e != 4 else 0)  # the fp32 accumulator of grad_w
        forward += vp * h * e if vp != vocab else 0
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


def bucket_runs(layout: Layout, stage: int) -> list[tuple[int, bool]]:
    """(elements, expert?) of each of the distributed optimizer's buckets on a rank of `stage`, before
    padding, as optim/distributed.py cuts them: parameters in reverse module order (about the order
    backward finishes them) in runs of at most optim.zero.bucket_elements, the tied embedding's copy
    (pp > 1) in a bucket of its own, and under expert parallelism each run split into its dense and
    its expert parameters (the experts' own group reduces them)."""
    mc = layout.config.model
    params = rank_params(layout, stage)
    sizes = list(params.sizes)[::-1]
    expert = list(params.expert or (False,) * len(sizes))[::-1]
    chunks = chunks_of(layout, stage)
    embed, head = any(c.first for c in chunks), any(c.last for c in chunks)
    tied = None
    if layout.pp > 1 and mc.tie_embeddings and embed != head:
        # the embedding is first in module order (last here), the head's copy last (first here)
        at = -1 if embed else 0
        tied = sizes.pop(at)
        expert.pop(at)
    limit = layout.config.optim.zero.bucket_elements
    runs: list[list[tuple[int, bool]]] = []
    size = 0
    for n, e in zip(sizes, expert, strict=True):
        if runs and size and size + n > limit:
            runs.append([])
            size = 0
        if not runs:
            runs.append([])
        runs[-1].append((n, e))
        size += n
    out = [part for run in runs for part in _by_kind(run)]
    return out + ([(tied, False)] if tied is not None else [])


def _by_kind(run: list[tuple[int, bool]]) -> list[tuple[int, bool]]:
    """A run's dense and expert elements, each a bucket when non-empty (optim/distributed._by_group)."""
    return [(total, kind) for kind in (False, True) if (total := sum(n for n, e in run if e == kind))]


def buckets(layout: Layout, stage: int) -> list[int]:
    """Elements of each bucket (bucket_runs without the kinds)."""
    return [n for n, _ in bucket_runs(layout, stage)]


def zero3_runs(layout: Layout, stage: int) -> tuple[list[tuple[int, bool]], int, int]:
    """ZeRO-3's buckets on a rank of `stage` as optim/distributed.py cuts them: one per block (its
    dense and, under expert parallelism, its expert parameters apart), one for the rest (embeddings,
    final norm, head), the tied embedding's copy (pp > 1) apart; returns ((elements, expert?) of each
    bucket, the largest block's elements, the rest's)."""
    mc = layout.config.model
    params = rank_params(layout, stage)
    chunks = chunks_of(layout, stage)
    embed, head = any(c.first for c in chunks), any(c.last for c in chunks)
    expert = params.expert or (False,) * len(params.sizes)
    blocks: dict[int, list[tuple[int, bool]]] = {}  # in module order (a dense stage's numbered from 0)
    for n, e, blk in zip(params.sizes, expert, params.block, strict=True):
        if blk >= 0:
            blocks.setdefault(blk, []).append((n, e))
    # pp > 1 with tied embeddings: the first stage's embedding and the last stage's copy alone
    tied = params.sizes[0 if embed else -1] if layout.pp > 1 and mc.tie_embeddings and embed != head else 0
    rest = params.total - sum(n for run in blocks.values() for n, _ in run) - tied
    runs = [part for run in blocks.values() for part in _by_kind(run)]
    biggest = max((sum(n for n, _ in run) for run in blocks.values()), default=0)
    return runs + [(n, False) for n in (rest, tied) if n], biggest, rest


def zero3_buckets(layout: Layout, stage: int) -> tuple[list[int], int, int]:
    """zero3_runs without the kinds: (bucket sizes, the largest block's size, the rest's size)."""
    runs, block, rest = zero3_runs(layout, stage)
    return [n for n, _ in runs], block, rest


def replicas(layout: Layout) -> int:
    """Ranks holding the same weights, over which gradients are reduced and ZeRO shards: dp x cp (the
    cp ranks of a replica compute on other tokens of the same samples; train/backends.build_backend
    hands the optimizer the dp_cp group)."""
    return layout.dp * layout.cp


def expert_replicas(layout: Layout) -> int:
    """Ranks holding the same experts: dp x cp / ep (the expert-data-parallel group)."""
    return layout.dp * layout.cp // layout.ep


def _shard(numel: int, shards: int, index: int) -> tuple[int, int]:
    """(padded shard size, elements of the parameters in shard `index`) of a bucket of numel."""
    size = -(-numel // shards)
    return size, max(0, min(numel, (index + 1) * size) - index * size)


def model_state(layout: Layout, stage: int, dp_rank: int = 0, device: str = "cuda") -> State:
    """The model state of the rank at (stage, dp_rank), as the backend allocates it."""
    cfg = layout.config
    z, dp = cfg.optim.zero, replicas(layout)
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
    # AdamW's temporaries: none fused (optim/adamw.py); else per tensor (CPU: single-tensor) or
    # over all of them (foreach, torch's default on CUDA)
    fused = fused_adamw(device)
    if not bf16 and dp == 1:  # PlainAdamW (make_optimizer): param.grad, torch's AdamW
        step = 0.0 if fused else 2 * max(params.sizes) * 4 if cpu else 4 * n
        return State(4 * n, 4 * n, 8 * n, 0.0, 0.0, step, 0.0)
    # optim/distributed.py: flat buckets of the compute dtype, fp32 main grads, fp32 masters + moments
    e = 2 if bf16 else 4
    stage_z = z.stage if dp > 1 else 0
    runs = zero3_runs(layout, stage)[0] if stage_z == 3 else bucket_runs(layout, stage)
    # each bucket sharded over its group: dp x cp, or for the experts the ranks holding the same ones
    group = [expert_replicas(layout) if x else dp for _, x in runs]
    split = [k if stage_z >= 1 else 1 for k in group]
    # this rank's shard of each: its dp x cp index, or among the expert replicas (ep consecutive ranks
    # of dp x cp hold different experts, the next ep the same ones again)
    index = [(dp_rank // layout.ep if x else dp_rank) if k > 1 else 0
             for (_, x), k in zip(runs, split, strict=True)]
    padded = [_shard(nb, k, i)[0] * k for (nb, _), k, i in zip(runs, split, index, strict=True)]
    owned = [_shard(nb, k, i)[1] for (nb, _), k, i in zip(runs, split, index, strict=True)]  # (no padding)
    shard_of = [p // k for p, k in zip(padded, split, strict=True)]
    shards = max(split)  # (the dense buckets')
    weights = e * sum(padded)
    grads = 4 * (sum(padded) if stage_z < 2 else sum(shard_of))
    master = 4 * sum(shard_of) if bf16 else 0
    optimizer = master + 8 * sum(owned)
    biggest = max(padded)
    overlap = cfg.parallel.overlap_grad_reduce
    # ZeRO-2: the staging bucket filling and (overlap_grad_reduce) the previous one still reducing:
    # optim/distributed.py keeps at most MAX_STAGING_BUCKETS alive, the filling one included
    pair = sorted(padded)[-MAX_STAGING_BUCKETS:] if overlap else [biggest]
    staging = 4 * sum(pair) if stage_z == 2 else 0.0
    fwd_gather = bwd_gather = 0.0
    if stage_z == 3:  # the weights' shards persist (a group of one holds its bucket whole); full
        # buckets only around their use
        weights = e * sum(sh if k > 1 else p for p, sh, k in zip(padded, shard_of, split, strict=True))
        _, block, rest = zero3_runs(layout, stage)
        chunks = chunks_of(layout, stage)
        # with the embedding and the head on one stage the rest bucket is gathered (and its fp32
        # staging alive) from the head's backward to the embedding's, across every block's backward
        whole = rest if any(c.first for c in chunks) and any(c.last for c in chunks) else 0
        block_p = _shard(block, shards, dp_rank)[0] * shards if block else 0
        # parallel.overlap_param_gather prefetches one block ahead: the block in use and the next
        # one's gathered weights are alive together, in a forward and in a backward
        ahead = block_p if cfg.parallel.overlap_param_gather else 0
        # (the rest, embedding and head both here, is held from the embedding's forward on)
        fwd_gather = e * max(biggest + ahead, block_p + ahead + whole)
        bwd_gather = e * (block_p + ahead + whole)
        # the bucket filling (a block's, or the rest's when it is not held across the blocks) and,
        # overlapped, the block before it still reducing; the rest's own staging beside them
        staging = 4 * (max(block_p, biggest if not whole else 0)
                       + (MAX_STAGING_BUCKETS - 1) * block_p * overlap + whole)
    # reducing them: what the reduce-scatter allocates beside the staging bucket (scatter_share)
    reduce = staging * (1 + scatter_share(shards, cpu))
    # finish (ZeRO-1): what reducing the main-gradient buffer allocates, all of the step's buckets'
    # alive together when overlapped (NCCL's outputs until finish() copies them in; gloo's receive
    # buffers until each is waited for, after the backward), one bucket's otherwise;
    # step: AdamW's temporaries (above), then the all-gather of the updated shards, in place into
    # the weights on NCCL; gloo's all_gather (a list of outputs) gathers into a flat buffer of its
    # own and copies out of it
    scatter = 0.0 if stage_z != 1 else 4 * (sum(padded) if overlap else biggest) * scatter_share(shards, cpu)
    adam = 0.0 if fused else 2 * 4 * min(max(params.sizes), max(owned)) if cpu else 4 * sum(owned)
    gather = e * biggest if stage_z in (1, 2) and cpu else 0.0  # (ZeRO-3 gathers on use)
    # construction: a bucket's fp32 values and its compute-dtype buffer beside the module's fp32
    # parameters (dropped as each bucket takes them over)
    build = (4 + (e if bf16 else 0)) * biggest
    return State(weights, grads, optimizer, staging, reduce, max(scatter, adam, gather), build,
                 grads_kept=True, gathered_forward=fwd_gather, gathered_backward=bwd_gather)


def scatter_share(shards: int, cpu: bool) -> float:
    """What reduce-scattering a bucket over `shards` ranks allocates, as a share of the bucket: NCCL's
    output shard (1/n); on gloo the chunks received from every other rank (comm._exchange_chunks,
    (n-1)/n: at dp = 2 the same half)."""
    return (shards - 1) / shards if cpu else 1 / shards


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
    tp, pp, m, cp = layout.tp, layout.pp, layout.micro_batches, layout.cp
    b, h = cfg.data.micro_batch_size, mc.hidden_size
    seq = cfg.seq_length
    s = seq // cp  # this rank's tokens: every per-token term scales with T/cp
    e = dtype_bytes(cfg)
    sp = layout.sequence_parallel
    rc = cfg.train.recompute
    ds = layout.backend == "deepspeed"
    vocab = padded_vocab(mc.vocab_size, tp, p.make_vocab_divisible_by) // tp
    facts = schedule_facts(p.schedule, pp, m, p.virtual_stages, 2.0) if pp > 1 else None
    per_block, whole_block = block_activations(mc, tp, sp, b, seq, e, device, rc, cp, p.cp_algorithm)
    if mc.moe.num_experts:  # MoE blocks keep another set than the dense ones (every layer_freq-th)
        first_moe = next(i for i in range(mc.num_layers) if mc.moe.is_moe(i))
        moe_kept, moe_whole = block_activations(mc, tp, sp, b, seq, e, device, rc, cp, p.cp_algorithm,
                                                layer=first_moe)
        dense = [i for i in range(mc.num_layers) if not mc.moe.is_moe(i)]
        dense_kept, dense_whole = block_activations(mc, tp, sp, b, seq, e, device, rc, cp, p.cp_algorithm,
                                                    layer=dense[0]) if dense else (0, 0)
        whole_block = max(moe_whole, dense_whole)
    attn_mask = attention_mask_bytes(b, seq, cp, e, cfg.data.document_mask)
    cp_fwd, cp_bwd = context_transients(mc, b, seq, tp, cp, p.cp_algorithm, e)
    masks = mask_bytes(layout)
    chunks = chunks_of(layout, stage)
    head = any(c.last for c in chunks)
    st = model_state(layout, stage, dp_rank, device)
    # activations: blocks of the in-flight chunk-micro-batches (the simulator's peak count), and
    # that count once the first backward has allocated the gradients
    inflight = facts.peak[stage] if facts else 1
    inflight_g = facts.peak_after_backward[stage] if facts else (1 if m > 1 else 0)
    layers = max(len(c.layers) for c in chunks)
    if mc.moe.num_experts:  # the chunk holding the most: its MoE and dense blocks counted apart
        blocks = max(sum(moe_kept if mc.moe.is_moe(i) else dense_kept for i in c.layers) for c in chunks)
    else:
        blocks = layers * per_block
    # a chunk-micro-batch in flight: its blocks' saved tensors and the mask its forward built (a
    # chunk without blocks, the embedding or the head alone, keeps none; a shared one is in masks)
    per_mb = blocks + (attn_mask if layers and not shared_masks(layout) else 0)
    fwd_t = bwd_t = whole_block if rc == "full" else 0.0  # one block recomputed during backward
    fwd_t, bwd_t = fwd_t + cp_fwd, bwd_t + cp_bwd  # (the recomputed block's are the same ones)
    fwd_t = max(fwd_t, mask_build_transient(b, seq, cp, cfg.data.document_mask))
    if head:
        head_inflight = m if p.schedule == "gpipe" and pp > 1 else 1
        head_saved, head_fwd, head_bwd = head_activations(mc, tp, sp, b, s, e, device, vocab)
        fwd_t, bwd_t = max(fwd_t, head_fwd), max(bwd_t, head_bwd)
    else:
        head_saved = head_inflight = 0
    msg = 4 if ds else e
    pipeline = facts.held[stage] * b * (s // tp if sp else s) * h * msg if facts else 0.0
    # before the first backward no gradient exists; after it, all of them (accumulated in place)
    before = inflight * per_mb + head_inflight * head_saved + masks
    after = inflight_g * per_mb + min(head_inflight, max(inflight_g, 1)) * head_saved + masks
    state = st.weights + st.optimizer
    phases = [  # (name, grads, activations, pipeline, transient)
        ("forward", st.grads if st.grads_kept else 0.0, before, pipeline, fwd_t + st.gathered_forward),
        # ZeRO-2's staging bucket lives from a backward's first gradient to its reduction: not
        # while the head's forward runs
        ("backward", st.grads, after, pipeline,
         max(bwd_t + st.staging + st.gathered_backward, fwd_t + st.gathered_forward if inflight_g else 0.0)),
        # a bucket reduced once its last gradient arrived: the micro-batch whose backward
        # finished it holds no activations any more, the other in-flight ones still do
        ("reduce", st.grads, max(inflight_g - 1, 0) * per_mb + masks, pipeline, st.reduce),
        ("step", st.grads, masks if shared_masks(layout) else 0.0, 0.0, st.step_transient),
    ]
    name, grads, acts, held, transient = max(phases, key=lambda ph: sum(ph[1:]))
    total = state + grads + acts + held + transient
    build = build_peak(layout, stage, st, device)
    # the terms are the training peak's; building can be larger (fp32 shards before the optimizer
    # turns them into bf16 buckets), and then it is the total
    return Memory(stage, st.weights, grads, st.optimizer, acts, held, transient, max(total, build),
                  "build" if build > total else name, build)
