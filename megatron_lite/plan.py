"""`megatron-lite plan`: which layout to train a model with on a given cluster, predicted before any
GPU is booked.

    cluster = Cluster.preset("a100-80gb", nodes=4)
    result = plan(Config.from_yaml("configs/gpt-1.3b.yaml"), cluster, global_batch=512)
    print(format_table(result, top=10))

Every candidate (tp x pp x dp, sequence parallelism, schedule and virtual stages, micro-batch size,
ZeRO stage and backend) is built with `Layout.build(cfg, world_size)`, the object training builds,
so a layout training would refuse is never proposed (LayoutError: skipped and counted). For each
valid one the model predicts, per rank:

memory (bytes; what THIS code holds, fp32 weights and grads whatever the precision; the peak of
the fullest rank, before the first backward of a step (no gradients yet) or after it):
  weights     this rank's parameters, counted analytically from the config: tp slices of the
              column/row-parallel weights, the vocabulary padded to make_vocab_divisible_by x tp
              (only when tp > 1: parallelize() pads, the serial model does not), the last stage's
              copy of a tied embedding; x4 bytes (DeepSpeed bf16 holds the module in bf16: x2)
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
  pipeline    the engine holds every sent activation and gradient until the end of the step
              (sends are waited for last): (#SEND_F + #SEND_B) x b x s x h x 4 on a stage

step time (seconds) on the cluster (bf16 peak, HBM bandwidth, NVLink and InfiniBand):
  compute     GEMM FLOPs per chunk per micro-batch / (peak x GEMM_EFFICIENCY), attention included,
              backward = 2 x forward, full recompute adds the blocks' forward again; plus the
              memory-bound element-wise kernels (norms, residual adds, activation functions, casts,
              softmax or flash attention, cross-entropy) as bytes / HBM bandwidth, counted per
              implementation profile (OURS: this code, what the planner ranks with; MEGATRON_2021:
              Megatron-LM's fused kernels and scatter/gather, for checking against its paper)
  tp / sp     the all-reduces (or all-gathers + reduce-scatters) of every layer, embedding and
              vocab-parallel loss, ring time at the group's bandwidth (intra-node when tp fits a node)
  pp          point-to-point per action; the bubble from simulate() with those chunk times
  dp / zero   the gradient all-reduce after backward (not overlapped, like GradSync), ZeRO-1's
              parameter broadcast, DeepSpeed's reduce-scatter + all-gather (stage 3: per micro-batch)
  optimizer   the AdamW step as memory traffic

Numbers reported: predicted step time, tokens/s, TFLOP/s per GPU (hardware FLOPs, recompute
included: what Narayanan et al. report), MFU (model FLOPs: 72·B·s·l·h²·(1 + s/6h + V/12lh) for
a GPT), communication share, bubble. The one calibrated constant is GEMM_EFFICIENCY (fitted on
one published row; see benchmarks/bench_plan.py and docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from .config import Config, ModelConfig, apply_override
from .errors import ConfigError, UsageError
from .layout import Layout
from .pipeline.schedules import build as build_schedule
from .pipeline.schedules import simulate

GB = 1e9

# The one calibrated constant: the fraction of the bf16 tensor-core peak a transformer GEMM reaches.
# Fitted on row 1 of Narayanan et al. 2021, Table 1 (1.7B, tp=pp=1, 32 A100s: 137 TFLOP/s per GPU)
# with the MEGATRON_2021 profile, then checked on every other row (benchmarks/bench_plan.py).
GEMM_EFFICIENCY = 0.61


@dataclass(frozen=True)
class Cluster:
    """Nodes of identical GPUs. Bandwidths in GB/s (1e9 bytes), per direction; latencies in us."""
    name: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float  # per GPU, GB (1e9 bytes)
    peak_tflops: float  # dense bf16 per GPU
    hbm_gbps: float  # device memory bandwidth
    intra_gbps: float  # NVLink, per GPU
    inter_gbps: float  # InfiniBand, per node (all NICs)
    intra_latency_us: float = 3.0
    inter_latency_us: float = 8.0
    device: str = "cuda"  # "cpu" only for checking the memory model on this machine

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def nic_gbps(self) -> float:
        """Inter-node bandwidth one GPU gets when every GPU of its node sends at once."""
        return self.inter_gbps / self.gpus_per_node

    @classmethod
    def preset(cls, name: str, nodes: int = 1, **overrides) -> "Cluster":
        if name not in CLUSTERS:
            raise UsageError(f"--cluster {name!r} is not a preset; choose one of {', '.join(CLUSTERS)} "
                             f"(and override single figures with --gpus-per-node, --peak-tflops, ...).")
        if nodes < 1:
            raise UsageError(f"--nodes={nodes} must be >= 1.")
        c = replace(CLUSTERS[name], nodes=nodes)
        given = {k: v for k, v in overrides.items() if v is not None}
        for k, v in given.items():
            if v <= 0:
                raise UsageError(f"--{k.replace('_', '-')}={v} must be positive.")
        return replace(c, **given)


CLUSTERS = {
    # DGX A100 (80 GB): 312 TFLOP/s bf16, HBM2e 2.04 TB/s, NVLink 3 (600 GB/s bidirectional),
    # 8 x 200 Gb/s HDR InfiniBand per node (Selene, the cluster of Narayanan et al.).
    "a100-80gb": Cluster("a100-80gb", 1, 8, 80.0, 312.0, 2039.0, 300.0, 8 * 200 / 8),
    # DGX H100: 989 TFLOP/s dense bf16, HBM3 3.35 TB/s, NVLink 4 (900 GB/s bidirectional),
    # 8 x 400 Gb/s NDR InfiniBand per node.
    "h100": Cluster("h100", 1, 8, 80.0, 989.0, 3350.0, 450.0, 8 * 400 / 8),
}


@dataclass(frozen=True)
class Profile:
    """What an implementation does besides GEMMs (memory traffic) and how it communicates."""
    name: str
    flash_attention: bool  # SDPA (no s x s tensor, causal half the FLOPs) vs materialised scores
    fused_elementwise: bool  # Megatron's fused bias-GeLU, bias-dropout-add, scale-mask-softmax
    scatter_gather: bool  # pipeline messages split over the tp ranks' NICs (Megatron §4.1)
    p2p_overlap: bool  # receives posted ahead (our engine) vs synchronous exchange
    optimizer_bytes_per_param: float  # AdamW step, clipping and gradient bucketing as memory traffic


OURS = Profile("megatron_lite", flash_attention=True, fused_elementwise=False, scatter_gather=False,
               p2p_overlap=True, optimizer_bytes_per_param=72.0)
MEGATRON_2021 = Profile("megatron-lm 2021", flash_attention=False, fused_elementwise=True,
                        scatter_gather=True, p2p_overlap=False, optimizer_bytes_per_param=40.0)


# ---- parameters --------------------------------------------------------------------------------
def padded_vocab(vocab_size: int, tp: int, divisible_by: int) -> int:
    """The vocabulary a rank's embedding slices: padded to tp x divisible_by, only when tp > 1."""
    if tp == 1:
        return vocab_size
    m = tp * divisible_by
    return -(-vocab_size // m) * m


def _norm_params(mc: ModelConfig) -> list[int]:
    h = mc.hidden_size
    return [h] if mc.norm == "rmsnorm" else ([h, h] if mc.bias else [h])


def block_params(mc: ModelConfig, tp: int = 1) -> list[int]:
    """numel of every parameter of one block on one tp rank, in module order."""
    h, D, inter = mc.hidden_size, mc.head_dim, mc.intermediate_size
    qkv = (mc.num_attention_heads + 2 * mc.num_kv_heads) * D // tp
    up = inter * (2 if mc.activation == "swiglu" else 1) // tp
    out = list(_norm_params(mc))
    out += [qkv * h] + ([qkv] if mc.bias else [])
    out += [h * mc.num_attention_heads * D // tp] + ([h] if mc.bias else [])  # row-parallel bias: whole
    out += _norm_params(mc)
    out += [up * h] + ([up] if mc.bias else [])
    out += [h * inter // tp] + ([h] if mc.bias else [])
    return out


def stage_params(mc: ModelConfig, layers: int, embed: bool, head: bool, tp: int = 1,
                 make_vocab_divisible_by: int = 128) -> list[int]:
    """numel of every parameter one rank holds: `layers` blocks, the embedding, the head."""
    h = mc.hidden_size
    vocab = padded_vocab(mc.vocab_size, tp, make_vocab_divisible_by) // tp
    out: list[int] = []
    if embed:
        out.append(vocab * h)
        if mc.position_embedding == "learned":
            out.append(mc.max_sequence_length * h)
    out += block_params(mc, tp) * layers
    if head:
        out += _norm_params(mc)
        if not (embed and mc.tie_embeddings):  # its own lm_head, or the last stage's tied copy
            out.append(vocab * h)
    return out


def param_count(mc: ModelConfig) -> int:
    """Parameters of the serial model (tied embeddings once), from the config alone."""
    return sum(stage_params(mc, mc.num_layers, True, True))


def zero1_partition(sizes: list[int], decay: list[bool], dp: int) -> list[int]:
    """Parameters per rank under torch's ZeroRedundancyOptimizer: per parameter group (decayed
    matrices, then vectors), largest first, each to the rank with the fewest so far."""
    totals = [0] * dp
    for group in (True, False):
        for n in sorted((s for s, d in zip(sizes, decay, strict=True) if d == group), reverse=True):
            i = totals.index(min(totals))
            totals[i] += n
    return totals


def _is_matrix(mc: ModelConfig, layers: int, embed: bool, head: bool) -> list[bool]:
    """Which of stage_params' entries are >= 2-D (AdamW's decay group)."""
    out: list[bool] = []
    norm = [False] * len(_norm_params(mc))
    if embed:
        out.append(True)
        if mc.position_embedding == "learned":
            out.append(True)
    blk = list(norm)
    blk += [True] + ([False] if mc.bias else [])
    blk += [True] + ([False] if mc.bias else [])
    blk += norm
    blk += [True] + ([False] if mc.bias else [])
    blk += [True] + ([False] if mc.bias else [])
    out += blk * layers
    if head:
        out += norm
        if not (embed and mc.tie_embeddings):
            out.append(True)
    return out


# ---- the schedule, simulated once per shape ------------------------------------------------------
@dataclass(frozen=True)
class ScheduleFacts:
    finish: float  # step time in units of one chunk's forward
    bubble: float  # idle fraction of the busiest stage
    peak: tuple[int, ...]  # per stage: chunk-micro-batches in flight at most (the simulator's count)
    peak_after_backward: tuple[int, ...]  # the same, counted only once a backward has run (grads exist)
    sends: tuple[int, ...]  # per stage: SEND_F + SEND_B actions (their tensors live until step end)


@lru_cache(maxsize=256)
def schedule_facts(name: str, pp: int, m: int, v: int, b_over_f: float) -> ScheduleFacts:
    lists = build_schedule(name, pp, m, v)
    finish, busy, peak = simulate(lists, 1.0, b_over_f)
    sends = tuple(sum(a.kind.startswith("SEND") for a in lst) for lst in lists)
    after = []
    for lst in lists:  # gradients are allocated by a stage's first backward: what is in flight then
        inflight, seen_b, most = 0, False, 0
        for a in lst:
            if a.kind == "F":
                inflight += 1
            elif a.kind == "B":
                if seen_b:
                    most = max(most, inflight)
                seen_b = True
                inflight -= 1
            if seen_b:
                most = max(most, inflight)
        after.append(most)
    return ScheduleFacts(finish, 1.0 - max(busy) / finish, tuple(peak), tuple(after), sends)


# ---- memory ----------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Peak bytes on the fullest rank, by kind."""
    stage: int
    weights: float
    grads: float
    optimizer: float
    activations: float  # saved tensors of the in-flight micro-batches (+ autocast weight copies)
    pipeline: float  # sent activations/gradients the engine holds until the step ends
    transient: float  # the largest short-lived buffer at the peak (logits, recompute, optimizer)
    total: float

    def as_dict(self) -> dict:
        return {k: (round(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _dtype_bytes(cfg: Config) -> int:
    return 2 if cfg.train.precision == "bf16" else 4


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


def _linear_params(mc: ModelConfig, tp: int) -> int:
    """Weights of one block's four linear layers on one tp rank: what autocast keeps bf16 copies of
    (biases are cast too, but the backward does not keep them)."""
    h, D = mc.hidden_size, mc.head_dim
    qkv = (mc.num_attention_heads + 2 * mc.num_kv_heads) * D // tp
    up = mc.intermediate_size * (2 if mc.activation == "swiglu" else 1) // tp
    return qkv * h + h * mc.num_attention_heads * D // tp + up * h + h * mc.intermediate_size // tp


def memory(layout: Layout, device: str = "cuda") -> Memory:
    """Peak memory of the fullest rank of `layout` (bytes), as this code allocates it."""
    native_zero1 = layout.config.optim.zero.stage == 1 and layout.backend != "deepspeed"
    dp_ranks = range(layout.dp) if native_zero1 else [0]  # its greedy partition is uneven
    return max((memory_of(layout, stage, d, device) for stage in range(layout.pp) for d in dp_ranks),
               key=lambda mem: mem.total)


def memory_of(layout: Layout, stage: int, dp_rank: int = 0, device: str = "cuda") -> Memory:
    """Peak memory of the rank at pipeline stage `stage` and data-parallel index `dp_rank` (every tp
    rank holds the same amount)."""
    cfg = layout.config
    mc, p, z = cfg.model, cfg.parallel, cfg.optim.zero
    tp, pp, dp, m = layout.tp, layout.pp, layout.dp, layout.micro_batches
    b, s, h = cfg.data.micro_batch_size, cfg.seq_length, mc.hidden_size
    e = _dtype_bytes(cfg)
    sp = layout.sequence_parallel
    rc = cfg.train.recompute
    ds = layout.backend == "deepspeed"
    N = b * s
    Ns = N // tp if sp else N
    vocab = padded_vocab(mc.vocab_size, tp, p.make_vocab_divisible_by) // tp
    facts = schedule_facts(p.schedule, pp, m, p.virtual_stages, 2.0) if pp > 1 else None
    per_block, full_block = _block_saved(mc, tp, sp, b, s, e, device, rc)
    chunks = layout.chunks(stage)
    layers = sum(len(c.layers) for c in chunks)
    embed, head = any(c.first for c in chunks), any(c.last for c in chunks)
    sizes = stage_params(mc, layers, embed, head, tp, p.make_vocab_divisible_by)
    n = sum(sizes)
    # weights, grads, optimizer state
    if ds:
        weights = n * (2 if e == 2 else 4) / (dp if z.stage == 3 else 1)
        optimizer = 12 * n / dp  # fp32 master partition + exp_avg + exp_avg_sq
        if z.stage == 1:
            grads = 4 * n  # param.grad in full until the step's reduction
        else:
            bucket = min(5e8, n) * 4 if z.stage == 2 else 0  # reduce bucket (DeepSpeed default)
            grads = (2 if z.stage == 3 else 1) * 4 * n / dp + bucket
    else:
        weights = 4 * n
        grads = 4 * n
        if z.stage == 1 and dp > 1:
            owned = zero1_partition(sizes, _is_matrix(mc, layers, embed, head), dp)[dp_rank]
        else:
            owned = n
        optimizer = 8 * owned
    # activations: blocks of the in-flight chunk-micro-batches (the simulator's peak count), and
    # that count once the first backward has allocated the gradients
    inflight = facts.peak[stage] if facts else 1
    inflight_g = facts.peak_after_backward[stage] if facts else (1 if m > 1 else 0)
    chunk_layers = max(len(c.layers) for c in chunks)
    per_mb = chunk_layers * per_block
    if e == 2 and not ds:  # autocast's bf16 weight copies, kept by each in-flight forward's graph
        per_mb += chunk_layers * _linear_params(mc, tp) * 2 * (0 if rc == "full" else 1)
        transient_copies = chunk_layers * _linear_params(mc, tp) * 2 if rc == "full" else 0.0
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
    pipeline = facts.sends[stage] * b * (s // tp if sp else s) * h * 4 if facts else 0.0
    # before the first backward no gradient exists; after it, all of them (accumulated in place)
    before = inflight * per_mb + head_inflight * head_saved
    after = inflight_g * per_mb + min(head_inflight, max(inflight_g, 1)) * head_saved + grads
    acts = max(before, after - grads)
    fb = weights + optimizer + max(before, after) + pipeline + transient
    opt_transient = (2 * max(sizes) * 4 if device == "cpu" else 4 * n) if not ds else 4 * max(sizes)
    step = weights + optimizer + grads + opt_transient
    return Memory(stage, weights, grads, optimizer, acts, pipeline,
                  transient if fb >= step else opt_transient, max(fb, step))


# ---- time --------------------------------------------------------------------------------------------
def layer_flops(mc: ModelConfig, b: int, s: int, causal_half: bool = False) -> float:
    """Forward FLOPs of one transformer block for b sequences of s tokens (whole block, all tp ranks)."""
    h, D = mc.hidden_size, mc.head_dim
    N = b * s
    qkv = 2 * N * h * (mc.num_attention_heads + 2 * mc.num_kv_heads) * D
    proj = 2 * N * mc.num_attention_heads * D * h
    mlp = 2 * N * h * mc.intermediate_size * (3 if mc.activation == "swiglu" else 2)
    attn = 4 * b * s * s * mc.num_attention_heads * D * (0.5 if causal_half else 1.0)
    return qkv + proj + mlp + attn


def model_flops(mc: ModelConfig, batch: int, s: int, recompute: bool = False) -> float:
    """FLOPs of one training step over `batch` sequences: forward + 2x backward of every block and the
    LM head (Narayanan et al. eq. 3 for a GPT: 72·B·s·l·h²·(1 + s/6h + V/12lh); with recompute the
    blocks' forward once more, 96·B·s·l·h²·(1 + s/6h + V/16lh))."""
    blocks = layer_flops(mc, batch, s) * mc.num_layers
    head = 2 * batch * s * mc.hidden_size * mc.vocab_size
    return (4 if recompute else 3) * blocks + 3 * head


def _elementwise_bytes(mc: ModelConfig, tp: int, sp: bool, b: int, s: int, e: int, prof: Profile) -> float:
    """Forward memory traffic of one block's non-GEMM kernels on one tp rank (backward: 2x)."""
    h = mc.hidden_size
    N = b * s
    a = mc.num_attention_heads // tp
    q, kv = a * mc.head_dim, mc.num_kv_heads // tp * mc.head_dim
    inter = mc.intermediate_size // tp
    ts = tp if sp else 1
    if prof.fused_elementwise:  # Megatron: 2 layer norms, 2 bias-dropout-adds, bias-GeLU, softmax
        per_token = (2 * 2 * h + 2 * 3.5 * h) / ts + 2 * inter
        attn = 0.0 if prof.flash_attention else 4.5 * b * a * s * s
        return (N * per_token + attn) * e
    # this code: every op is its own kernel; the residual stream and norms run in fp32
    norms = 2 * 8 * h / ts  # read + write fp32
    casts = 2 * (4 + 2) * h if e == 2 else 0  # autocast's bf16 copies of the norm outputs
    adds = 2 * (4 + e + 4) * h / ts  # residual adds (fp32 += compute dtype)
    rope = 6 * (q + kv) * e if mc.position_embedding == "rope" else 0
    copy_out = 2 * q * e if mc.position_embedding == "rope" else 0  # SDPA output to (B, T, H*D)
    act = (5 if mc.activation == "swiglu" else 2) * inter * e
    tp_extra = 0.0
    if tp > 1:
        tp_extra = 2 * 2 * h * e  # the clone before each all-reduce (or the reduce-scatter's output)
        if mc.bias:
            tp_extra += 2 * 2 * h * e / ts  # row-parallel bias added after the reduction
    attn = 0.0 if prof.flash_attention else 4.5 * b * a * s * s * e
    return N * (norms + casts + adds + rope + copy_out + act + tp_extra) + attn


def _allreduce_time(nbytes: float, ranks: list[int], c: Cluster, kind: str = "all_reduce") -> float:
    """Ring (hierarchical across nodes) time of one collective over `ranks` (placement by rank id)."""
    n = len(ranks)
    if n <= 1 or nbytes <= 0:
        return 0.0
    per_node = Counter(r // c.gpus_per_node for r in ranks)
    k, nodes = max(per_node.values()), len(per_node)
    factor = 2.0 if kind == "all_reduce" else 1.0
    t = factor * (k - 1) / k * nbytes / (c.intra_gbps * GB) + factor * (k - 1) * c.intra_latency_us * 1e-6
    if nodes > 1:
        t += factor * (nodes - 1) / nodes * nbytes / k / (c.nic_gbps * GB) \
            + factor * (nodes - 1) * c.inter_latency_us * 1e-6
    return t


def _p2p_time(nbytes: float, a: int, b: int, c: Cluster, tp: int, scatter_gather: bool) -> float:
    if a // c.gpus_per_node == b // c.gpus_per_node:
        return nbytes / (c.intra_gbps * GB) + c.intra_latency_us * 1e-6
    if scatter_gather and tp > 1:  # each tp rank sends 1/tp over its own NIC, then an NVLink all-gather
        return nbytes / tp / (c.nic_gbps * GB) + (tp - 1) / tp * nbytes / (c.intra_gbps * GB) \
            + c.inter_latency_us * 1e-6 + (tp - 1) * c.intra_latency_us * 1e-6
    return nbytes / (c.nic_gbps * GB) + c.inter_latency_us * 1e-6


@dataclass
class Timing:
    step_s: float
    compute_s: float  # GEMMs + element-wise kernels on the busiest stage (recompute included)
    comm_s: float  # exposed communication: tp/sp, p2p, dp/zero, tied-embedding sync
    bubble: float  # idle fraction of the busiest stage (simulator)
    optimizer_s: float
    tokens_per_s: float
    tflops_per_gpu: float  # hardware FLOPs (recompute included) per GPU per second
    mfu: float  # model FLOPs / (step x GPUs x peak)

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.step_s if self.step_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "comm_share": self.comm_share}


def step_time(layout: Layout, cluster: Cluster, profile: Profile = OURS,
              gemm_efficiency: float = GEMM_EFFICIENCY) -> Timing:
    """Predicted time of one optimizer step of `layout` on `cluster`."""
    cfg = layout.config
    mc, p, z = cfg.model, cfg.parallel, cfg.optim.zero
    tp, pp, dp, m = layout.tp, layout.pp, layout.dp, layout.micro_batches
    b, s, h = cfg.data.micro_batch_size, cfg.seq_length, mc.hidden_size
    e = 2 if cfg.train.precision == "bf16" or profile is MEGATRON_2021 else 4
    sp = layout.sequence_parallel
    rc = cfg.train.recompute
    N = b * s
    peak = cluster.peak_tflops * 1e12 * gemm_efficiency
    hbm = cluster.hbm_gbps * GB
    topo = layout.topology
    tp_ranks = topo.group_ranks(("tp",))[0]
    dp_ranks = topo.group_ranks(("dp",))[0]
    pp_ranks = topo.group_ranks(("pp",))[0]
    vocab = padded_vocab(mc.vocab_size, tp, p.make_vocab_divisible_by) // tp
    if profile is MEGATRON_2021:
        vocab = mc.vocab_size // tp

    # one block, one micro-batch, one tp rank
    gemm = layer_flops(mc, b, s, causal_half=profile.flash_attention) / tp / peak
    elem = _elementwise_bytes(mc, tp, sp, b, s, e, profile) / hbm
    act = N * h * e
    if tp > 1 and sp:  # per layer: 2 all-gathers (fp32 norm outputs in our code) + 2 reduce-scatters
        g = 2 * _allreduce_time(N * h * (e if profile is MEGATRON_2021 else 4), tp_ranks, cluster, "gather")
        r = 2 * _allreduce_time(act, tp_ranks, cluster, "gather")
        tp_fwd, tp_bwd = g + r, g + r
    elif tp > 1:
        tp_fwd = 2 * _allreduce_time(act, tp_ranks, cluster)
        tp_bwd = 2 * _allreduce_time(N * h * (e if profile is MEGATRON_2021 else 4), tp_ranks, cluster)
    else:
        tp_fwd = tp_bwd = 0.0
    f_block = gemm + elem + tp_fwd
    b_block = 2 * gemm + 2 * elem + tp_bwd
    if rc == "full":
        b_block += f_block
    elif rc == "selective":
        b_block += 4 * b * s * s * mc.num_attention_heads * mc.head_dim / tp / peak \
            * (0.5 if profile.flash_attention else 1.0)
    tp_block = tp_fwd + tp_bwd + (tp_fwd if rc == "full" else 0.0)

    # embedding and head (first and last chunk)
    head_gemm = 2 * N * h * vocab / peak
    ce_bytes = 12 * N * vocab * 4 + 2 * vocab * h * 4  # softmax passes + the embedding's dense gradient
    head_f = head_gemm + ce_bytes / 3 / hbm
    head_b = 2 * head_gemm + 2 * ce_bytes / 3 / hbm
    head_comm = 0.0
    if tp > 1:
        head_comm = 3 * _allreduce_time(N * 4, tp_ranks, cluster)  # vocab-parallel CE
        head_comm += 2 * _allreduce_time(N * h * 4, tp_ranks, cluster)  # embedding fwd, head input bwd
        head_f += head_comm / 2
        head_b += head_comm / 2

    # per chunk (the slowest stage decides), p2p per action
    v = p.virtual_stages
    chunk_layers = max(len(c.layers) for st in range(pp) for c in layout.chunks(st))
    # the stage holding the head runs it once per micro-batch, spread over its v chunks
    f_chunk = chunk_layers * f_block + head_f / v
    b_chunk = chunk_layers * b_block + head_b / v
    comm = tp_block * chunk_layers + head_comm / v
    p2p = 0.0
    if pp > 1:
        msg = b * (s // tp if sp else s) * h * (e if profile is MEGATRON_2021 else 4)
        p2p = max(_p2p_time(msg, pp_ranks[i], pp_ranks[i + 1], cluster, tp, profile.scatter_gather)
                  for i in range(pp - 1))
        if profile.p2p_overlap:  # the receive was posted one action ahead: only its latency shows
            latency = cluster.inter_latency_us if cluster.nodes > 1 else cluster.intra_latency_us
            p2p = min(p2p, latency * 1e-6)
        f_chunk += p2p
        b_chunk += p2p
        comm += 2 * p2p
        ratio = max(0.25, round(b_chunk / f_chunk * 4) / 4)  # a few shapes to simulate, cached
        facts = schedule_facts(p.schedule, pp, m, v, ratio)
        busy = m * v * (f_chunk + b_chunk)
        pipe = max(busy, facts.finish * (f_chunk + b_chunk) / (1 + ratio))
        bubble = facts.bubble
        n_chunks = m * v
    else:
        pipe = m * (f_chunk + b_chunk)
        bubble = 0.0
        n_chunks = m
    comm_total = comm * n_chunks

    # after the pipeline: data parallelism / ZeRO, tied embeddings, optimizer
    n_rank = max(sum(stage_params(mc, sum(len(c.layers) for c in chunks), any(c.first for c in chunks),
                                  any(c.last for c in chunks), tp, p.make_vocab_divisible_by))
                 for chunks in (layout.chunks(st) for st in range(pp)))
    grad_bytes = 4 * n_rank
    after = 0.0
    if dp > 1:
        if layout.backend == "deepspeed":
            after += 1.5 * _allreduce_time(grad_bytes, dp_ranks, cluster)  # reduce-scatter + all-gather
            if z.stage == 3:  # gather parameters for every forward and backward, no prefetch
                gathers = m * (3 if rc == "full" else 2)
                after += gathers * _allreduce_time(n_rank * e, dp_ranks, cluster, "gather")
        else:
            after += _allreduce_time(grad_bytes, dp_ranks, cluster)
            if z.stage == 1:  # ZeroRedundancyOptimizer broadcasts every parameter from its owner
                after += _allreduce_time(4 * n_rank, dp_ranks, cluster, "gather")
    if pp > 1 and mc.tie_embeddings:
        first_last = [pp_ranks[0], pp_ranks[-1]]
        after += _allreduce_time(vocab * h * 4, first_last, cluster)
    opt = profile.optimizer_bytes_per_param * n_rank / (dp if z.stage >= 1 else 1) / hbm
    if z.stage >= 1:
        opt += 16 * n_rank / hbm  # clipping and bucketing still touch every gradient
    step = pipe + after + opt
    comm_total += after

    tokens = layout.global_batch_size * s
    world = layout.world_size
    hw = model_flops(mc, layout.global_batch_size, s, recompute=rc == "full")
    mf = model_flops(mc, layout.global_batch_size, s)
    return Timing(step, n_chunks * (f_chunk + b_chunk) - comm, comm_total, bubble, opt, tokens / step,
                  hw / step / world / 1e12, mf / step / world / (cluster.peak_tflops * 1e12))


def fit_gemm_efficiency(layout: Layout, cluster: Cluster, tflops_per_gpu: float,
                        profile: Profile = MEGATRON_2021) -> float:
    """The GEMM efficiency at which step_time predicts `tflops_per_gpu` for `layout` (bisection:
    the prediction grows monotonically with it). How GEMM_EFFICIENCY was obtained."""
    lo, hi = 0.01, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if step_time(layout, cluster, profile, mid).tflops_per_gpu < tflops_per_gpu:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---- enumeration -----------------------------------------------------------------------------------
@dataclass
class Candidate:
    overrides: dict  # dotted config keys -> values: what to pass to `megatron-lite train`
    layout: Layout
    memory: Memory
    timing: Timing
    fits: bool

    def describe(self) -> str:
        o = self.overrides
        out = self.layout.describe()
        out += f" | mb {o['data.micro_batch_size']}x{o['parallel.microbatches']}"
        if o["train.recompute"] != "none":
            out += f" | recompute {o['train.recompute']}"
        return out

    def as_dict(self) -> dict:
        return {"overrides": self.overrides, "layout": self.describe(), "fits": self.fits,
                "memory_bytes": self.memory.as_dict(), "timing": self.timing.as_dict()}


@dataclass
class PlanResult:
    cluster: Cluster
    model_params: int
    global_batch: int
    seq: int
    ranked: list[Candidate]  # fitting candidates, fastest first
    too_big: list[Candidate]  # valid layouts that do not fit, smallest first
    rejected: Counter = field(default_factory=Counter)  # LayoutError sentence (shortened) -> count
    considered: int = 0


# ZeRO variants tried by default: DeepSpeed stage 1 holds more than the native one (its fp32 master
# partition) for the same traffic, so it is left to --zero.
DEFAULT_ZERO = ((0, "native"), (1, "native"), (2, "deepspeed"), (3, "deepspeed"))
ZERO_NAMES = {"0": (0, "native"), "1": (1, "native"), "ds1": (1, "deepspeed"), "ds2": (2, "deepspeed"),
              "ds3": (3, "deepspeed")}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_overrides(cfg: Config, cluster: Cluster, global_batch: int, micro_batch_sizes=(1, 2, 4, 8),
                        schedules=("1f1b", "interleaved"), max_virtual_stages: int = 4,
                        zero=DEFAULT_ZERO,
                        sequence_parallel: str = "auto", tp_values=None, pp_values=None):
    """Every (tp, pp, dp, sp, schedule, v, micro-batch, ZeRO) to try, as config overrides."""
    world = cluster.world_size
    L = cfg.model.num_layers
    for tp in tp_values or [t for t in _divisors(cluster.gpus_per_node) if world % t == 0]:
        for pp in pp_values or [q for q in _divisors(world // tp) if q <= L]:
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            sps = [False] if tp == 1 else {"auto": [True, False], "on": [True],
                                             "off": [False]}[sequence_parallel]
            scheds = [("1f1b", 1)] if pp == 1 else []
            if pp > 1:
                for name in schedules:
                    if name == "interleaved":
                        scheds += [("interleaved", v) for v in range(2, max_virtual_stages + 1)
                                   if L % (pp * v) == 0]
                    else:
                        scheds.append((name, 1))
            for b in micro_batch_sizes:
                if per_replica % b:
                    continue
                for sp in sps:
                    for sched, v in scheds:
                        for stage, backend in zero:
                            if dp == 1 and stage > 0:
                                continue
                            if sequence_parallel == "auto" and tp > 1 and sp != (
                                    cfg.seq_length % tp == 0 and not (backend == "deepspeed" and stage > 0)):
                                continue  # SP wherever it is allowed (it is never worse), else without
                            yield {"parallel.tp": tp, "parallel.pp": pp, "parallel.dp": dp,
                                   "parallel.sequence_parallel": sp, "parallel.schedule": sched,
                                   "parallel.virtual_stages": v, "parallel.microbatches": per_replica // b,
                                   "data.micro_batch_size": b, "data.global_batch_size": global_batch,
                                   "optim.zero.stage": stage, "optim.zero.backend": backend,
                                   "train.grad_accum": 1}


def build_config(base: Config, overrides: dict) -> Config:
    """`base` with dotted overrides (any keys), validated like a command line's."""
    raw = copy.deepcopy(base.to_dict())
    for key, value in overrides.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return Config.from_dict(raw).validate()


def _candidate_config(base: Config, ov: dict) -> Config:
    """build_config for the keys candidate_overrides sets, without re-parsing the whole tree."""
    p = replace(base.parallel, tp=ov["parallel.tp"], pp=ov["parallel.pp"], dp=ov["parallel.dp"],
                sequence_parallel=ov["parallel.sequence_parallel"], schedule=ov["parallel.schedule"],
                virtual_stages=ov["parallel.virtual_stages"], microbatches=ov["parallel.microbatches"])
    d = replace(base.data, micro_batch_size=ov["data.micro_batch_size"],
                global_batch_size=ov["data.global_batch_size"])
    o = replace(base.optim, zero=replace(base.optim.zero, stage=ov["optim.zero.stage"],
                                         backend=ov["optim.zero.backend"]))
    t = replace(base.train, grad_accum=ov["train.grad_accum"], recompute=ov.get("train.recompute",
                                                                                   base.train.recompute))
    return replace(base, parallel=p, data=d, optim=o, train=t).validate()


def plan(cfg: Config, cluster: Cluster, global_batch: int, seq: int | None = None, profile: Profile = OURS,
         recompute=("none", "selective", "full"), headroom: float = 0.1, require_fit: bool = True,
         **enumerate_kw) -> PlanResult:
    """Enumerate, validate through Layout.build, predict, rank."""
    if global_batch < 1:
        raise UsageError(f"--global-batch={global_batch} must be >= 1.")
    base = cfg
    if seq is not None:
        if seq < 1:
            raise UsageError(f"--seq={seq} must be >= 1.")
        base = build_config(cfg, {"data.seq_length": seq})
    s = base.seq_length
    budget = cluster.gpu_memory_gb * GB * (1 - headroom)
    result = PlanResult(cluster, param_count(base.model), global_batch, s, [], [])
    for ov in candidate_overrides(base, cluster, global_batch, **enumerate_kw):
        result.considered += 1
        try:
            layout_cfg = _candidate_config(base, ov)
            layout = Layout.build(layout_cfg, cluster.world_size)
        except ConfigError as err:  # LayoutError mostly; a field a candidate sets could be refused too
            result.rejected[_short(str(err))] += 1
            continue
        # recompute is a train.* choice the Layout does not judge: one Layout, three cost models
        for rc in recompute:
            full = {**ov, "train.recompute": rc}
            lay = Layout(replace(layout_cfg, train=replace(layout_cfg.train, recompute=rc)), layout.topology,
                         layout.micro_batches, layout.backend)
            mem = memory(lay, cluster.device)
            cand = Candidate(full, lay, mem, step_time(lay, cluster, profile), mem.total <= budget)
            (result.ranked if cand.fits or not require_fit else result.too_big).append(cand)
    # equal within 0.5%: the one that needs less memory first
    result.ranked.sort(key=lambda c: (round(math.log(c.timing.step_s) / math.log(1.005)), c.memory.total))
    result.too_big.sort(key=lambda c: c.memory.total)
    return result


def _short(msg: str) -> str:
    """A rejection reason with its numbers as N, so equal reasons count together."""
    return re.sub(r"\d+", "N", msg.split(";")[0])[:160]


# ---- output ------------------------------------------------------------------------------------------
def override_args(overrides: dict) -> str:
    """The dotted overrides as command-line words (YAML values: true/false, numbers, names)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()
                    if k != "train.grad_accum")


def format_table(result: PlanResult, top: int = 10, config_name: str = "C") -> str:
    c = result.cluster
    lines = [f"{c.nodes} x {c.gpus_per_node} {c.name} ({c.gpu_memory_gb:g} GB, {c.peak_tflops:g} TFLOP/s) | "
             f"model {result.model_params / 1e9:.3g}B params | global batch {result.global_batch} x "
             f"{result.seq} tokens",
             f"{result.considered} layouts tried: {sum(result.rejected.values())} refused by Layout, "
             f"{len(result.too_big)} do not fit memory, {len(result.ranked)} ranked"]
    if result.rejected:
        why, n = result.rejected.most_common(1)[0]
        lines.append(f"most refused: {why} ({n}x)")
    if not result.ranked:
        lines.append("no layout fits: add nodes, lower the micro-batch, or allow recompute / ZeRO.")
        if result.too_big:
            best = result.too_big[0]
            lines.append(f"smallest: {best.describe()} needs {best.memory.total / GB:.1f} GB per rank.")
        return "\n".join(lines)
    head = ["#", "layout", "mem/rank GB", "step s", "tokens/s", "TFLOP/s/GPU", "MFU", "comm", "bubble"]
    rows = []
    for i, cand in enumerate(result.ranked[:top], 1):
        t = cand.timing
        rows.append([str(i), cand.describe(), f"{cand.memory.total / GB:.1f}", f"{t.step_s:.3g}",
                     f"{t.tokens_per_s:,.0f}", f"{t.tflops_per_gpu:.0f}", f"{100 * t.mfu:.1f}%",
                     f"{100 * t.comm_share:.1f}%", f"{100 * t.bubble:.1f}%"])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 1 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths,
                                                                                                 strict=True)))
    lines += ["", fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines += ["", f"train #1: megatron-lite launch torchrun --config {config_name} "
                  f"{override_args(result.ranked[0].overrides)}"]
    return "\n".join(lines)


def write_json(result: PlanResult, path: str | Path) -> None:
    out = {"cluster": asdict(result.cluster), "model_params": result.model_params,
           "global_batch": result.global_batch, "seq": result.seq, "considered": result.considered,
           "rejected": dict(result.rejected), "gemm_efficiency": GEMM_EFFICIENCY,
           "ranked": [c.as_dict() for c in result.ranked],
           "too_big": [c.as_dict() for c in result.too_big[:20]]}
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def resolve_config(name: str) -> Path:
    """A YAML path, or the name of a preset in configs/ (gpt2-125m, gpt-1.3b, llama2-7b, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    presets = Path(__file__).resolve().parents[1] / "configs"
    for cand in (presets / name, presets / f"{name}.yaml"):
        if cand.is_file():
            return cand
    known = sorted(p.stem for p in presets.glob("*.yaml")) if presets.is_dir() else []
    raise ConfigError(f"--config {name!r} is neither a file nor a preset; pass a YAML path or one of "
                      f"{', '.join(known) or 'the configs/ presets'}.")
