"""Peak memory per rank (bytes): what THIS code holds, fp32 weights and grads whatever the precision;
the peak of the fullest rank, before the first backward of a step (no gradients yet) or after it.

  weights     this rank's parameters (stage.rank_params: a meta-device GPT of the stage's pieces,
              sliced by the TP table, so the vocabulary is padded exactly when parallelize() pads it
              and the last stage holds its copy of a tied embedding); x4 bytes (DeepSpeed bf16 holds
              the module in bf16: x2)
  grads       x4 bytes (fp32, also under bf16 autocast); DeepSpeed stage 2/3 keep their partition
  optimizer   AdamW exp_avg + exp_avg_sq (8 bytes/param); native ZeRO-1: the parameters
              ZeroRedundancyOptimizer's greedy partition gives the fullest rank; DeepSpeed: its fp32
              master partition (4/dp) + moments (8/dp)
  activations what autograd saves per block (counted tensor by tensor, see _block_saved), times
              the peak number of micro-batch chunks in flight on the stage, taken from the schedule
              simulator (pipeline/schedules.simulate: 1F1B p on stage 0, GPipe m, interleaved its own
              count); full recompute keeps each block's input plus one block's activations while it
              is recomputed; under bf16 autocast the bf16 weight copies each in-flight forward keeps;
              the head (fused linear+CE at tp=1 keeps grad_w (V x h) per micro-batch; at tp>1 the
              fp32 softmax over the padded vocabulary slice)
  pipeline    the message buffers the engine holds at once (chunk outputs until their backward
              and their send's release, posted receives, gradients until their send is released;
              pipeline/schedules.held_messages walks the stage's list as the engine keeps them:
              flat in m for 1F1B and interleaving, m + 2 for GPipe) x b x s x h x 4
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import Config, ModelConfig
from ..layout import Layout
from ..slicing import padded_vocab
from .stage import block_linear_params, rank_params, schedule_facts


@dataclass
class Memory:
    """Peak bytes on the fullest rank, by kind."""
    stage: int
    weights: float
    grads: float
    optimizer: float
    activations: float  # saved tensors of the in-flight micro-batches (+ autocast weight copies)
    pipeline: float  # message buffers the engine holds at its peak (schedules.held_messages)
    transient: float  # the largest short-lived buffer at the peak (logits, recompute, optimizer)
    total: float

    def as_dict(self) -> dict:
        return {k: (round(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def dtype_bytes(cfg: Config) -> int:
    return 2 if cfg.train.precision == "bf16" else 4


def zero1_partition(sizes, decay, dp: int) -> list[int]:
    """Parameters per rank under torch's ZeroRedundancyOptimizer: per parameter group (decayed
    matrices, then vectors), largest first, each to the rank with the fewest so far."""
    totals = [0] * dp
    for group in (True, False):
        for n in sorted((s for s, d in zip(sizes, decay, strict=True) if d == group), reverse=True):
            i = totals.index(min(totals))
            totals[i] += n
    return totals


def _block_saved(mc: ModelConfig, tp: int, sp: bool, b: int, s: int, e: int, device: str,
                 recompute: str) -> tuple[float, float]:
    """(bytes autograd keeps for one block and one micro-batch, bytes of that block's full set) on
    one tp rank, weights and their autocast copies excluded. Counted tensor by tensor for this code
    (tests/unit/test_plan.py checks it against saved_tensors_hooks): the residual stream and norms in
    fp32, what a GEMM produces in the compute dtype (e bytes), SDPA keeping q, k, v and its output."""
    h, D = mc.hidden_size, mc.head_dim
    N = b * s
    Ns = N // tp if sp else N
    q, kv = mc.num_attention_heads // tp * D, mc.num_kv_heads // tp * D
    inter = mc.intermediate_size // tp
    rope, gqa = mc.position_embedding == "rope", mc.num_kv_heads != mc.num_attention_heads
    if mc.norm == "layernorm":
        norm = Ns * h * 4 + Ns * 8  # input + mean/rstd
    else:  # RMSNorm: input + rstd; torch's CPU path also keeps the normalised input
        norm = Ns * h * 4 + Ns * 4 + (Ns * h * 4 if device == "cpu" else 0)
    lse = b * (mc.num_attention_heads // tp) * s * 4
    qkv = 0 if rope and gqa else N * (q + 2 * kv) * e  # the fused output, alive while a view of it is kept
    fresh = (N * (q + kv) * e if rope else 0) + (2 * N * q * e if gqa else 0)  # rotated q, k; repeated k, v
    if rope and gqa:
        fresh = 3 * N * q * e
    # SDPA's output; copied to (B, T, H*D) for the projection unless its layout already is (B, T, H, D)
    # (it is, for q, k, v that are views of the fused projection); RoPE's cos/sin cast per call
    out = N * q * e * (2 if rope else 1) + (2 * s * D * e if rope and e == 2 else 0)
    mlp = (4 if mc.activation == "swiglu" else 2) * N * inter * e
    drop = 0.0
    if mc.dropout > 0:  # residual dropouts keep their masks (scaled, in the input dtype on CPU)
        drop = 2 * Ns * h * (e if device == "cpu" else 1)
    full = 2 * norm + 2 * N * h * e + qkv + fresh + out + lse + mlp + drop
    if recompute == "full":
        return Ns * h * 4, full
    if recompute == "selective":  # the attention core's output and statistics are recomputed
        return full - lse - (N * q * e if rope else 0), full
    return full, full


def peak_memory(layout: Layout, device: str = "cuda") -> Memory:
    """Peak memory of the fullest rank of `layout` (bytes), as this code allocates it."""
    native_zero1 = layout.config.optim.zero.stage == 1 and layout.backend != "deepspeed"
    dp_ranks = range(layout.dp) if native_zero1 else [0]  # its greedy partition is uneven
    return max((memory_of(layout, stage, d, device) for stage in range(layout.pp) for d in dp_ranks),
               key=lambda mem: mem.total)


def _model_state(layout: Layout, stage: int, dp_rank: int, e: int) -> tuple[float, float, float]:
    """(weights, grads, optimizer state) bytes of one rank."""
    z, dp = layout.config.optim.zero, layout.dp
    params = rank_params(layout, stage)
    n = params.total
    if layout.backend == "deepspeed":
        weights = n * (2 if e == 2 else 4) / (dp if z.stage == 3 else 1)
        optimizer = 12 * n / dp  # fp32 master partition + exp_avg + exp_avg_sq
        if z.stage == 1:
            return weights, 4 * n, optimizer  # param.grad in full until the step's reduction
        bucket = min(5e8, n) * 4 if z.stage == 2 else 0  # reduce bucket (DeepSpeed default)
        return weights, (2 if z.stage == 3 else 1) * 4 * n / dp + bucket, optimizer
    owned = zero1_partition(params.sizes, params.matrix, dp)[dp_rank] if z.stage == 1 and dp > 1 else n
    return 4 * n, 4 * n, 8 * owned


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
    N = b * s
    Ns = N // tp if sp else N
    vocab = padded_vocab(mc.vocab_size, tp, p.make_vocab_divisible_by) // tp
    facts = schedule_facts(p.schedule, pp, m, p.virtual_stages, 2.0) if pp > 1 else None
    per_block, full_block = _block_saved(mc, tp, sp, b, s, e, device, rc)
    chunks = layout.chunks(stage)
    head = any(c.last for c in chunks)
    sizes = rank_params(layout, stage).sizes
    n = sum(sizes)
    weights, grads, optimizer = _model_state(layout, stage, dp_rank, e)
    # activations: blocks of the in-flight chunk-micro-batches (the simulator's peak count), and
    # that count once the first backward has allocated the gradients
    inflight = facts.peak[stage] if facts else 1
    inflight_g = facts.peak_after_backward[stage] if facts else (1 if m > 1 else 0)
    chunk_layers = max(len(c.layers) for c in chunks)
    per_mb = chunk_layers * per_block
    if e == 2 and not ds:  # autocast's bf16 weight copies, kept by each in-flight forward's graph
        per_mb += chunk_layers * block_linear_params(mc, tp) * 2 * (0 if rc == "full" else 1)
        transient_copies = chunk_layers * block_linear_params(mc, tp) * 2 if rc == "full" else 0.0
    else:
        transient_copies = 0.0
    transient = full_block if rc == "full" else 0.0  # one block recomputed during backward
    if head:
        head_inflight = m if p.schedule == "gpipe" and pp > 1 else 1
        ln = Ns * h * 4 + Ns * 8
        if tp == 1:  # fused linear + cross-entropy: grad_x and grad_w computed in the forward
            head_saved = ln + N * h * 4 + vocab * h * 4
            transient = max(transient, min(1024, N) * vocab * 4 * 2)  # a chunk's logits + logsumexp
        else:  # linear input and the fp32 softmax over this rank's vocabulary slice
            head_saved = ln + N * h * e + N * vocab * 4 + (vocab * h * 2 if e == 2 else 0)
            transient = max(transient, N * vocab * (e + 4))  # logits and their fp32 copy
    else:
        head_saved = head_inflight = 0
    transient = max(transient, transient_copies)
    pipeline = facts.held[stage] * b * (s // tp if sp else s) * h * 4 if facts else 0.0
    # before the first backward no gradient exists; after it, all of them (accumulated in place)
    before = inflight * per_mb + head_inflight * head_saved
    after = inflight_g * per_mb + min(head_inflight, max(inflight_g, 1)) * head_saved + grads
    acts = max(before, after - grads)
    fb = weights + optimizer + max(before, after) + pipeline + transient
    opt_transient = (2 * max(sizes) * 4 if device == "cpu" else 4 * n) if not ds else 4 * max(sizes)
    step = weights + optimizer + grads + opt_transient
    return Memory(stage, weights, grads, optimizer, acts, pipeline,
                  transient if fb >= step else opt_transient, max(fb, step))
