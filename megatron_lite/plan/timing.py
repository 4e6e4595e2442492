"""Predicted time of one optimizer step (seconds) on a cluster (bf16 peak, HBM bandwidth, NVLink and
InfiniBand), as the sum of four terms, each its own function:

  compute     GEMM FLOPs per chunk per micro-batch / (peak x GEMM_EFFICIENCY), attention included,
              backward = 2 x forward, full recompute adds the blocks' forward again; plus the
              memory-bound element-wise kernels (norms, residual adds, activation functions, casts,
              softmax or flash attention, cross-entropy) as bytes / HBM bandwidth, and the additive
              document mask (packed documents) built once per chunk-forward (mask_term), counted per
              implementation profile (OURS: this code, what the planner ranks with; MEGATRON_2021:
              Megatron-LM's fused kernels and scatter/gather, for checking against its paper)
  tp / sp     the all-reduces (or all-gathers + reduce-scatters) of every layer, embedding and
              vocab-parallel loss in the compute dtype, ring time at the group's bandwidth (intra-node
              when tp fits a node); under SP backward all-gathers the QKV / FC1 (and LM head) inputs
              again, as they are saved as sequence shards (Megatron does the same)
  cp          context parallelism (cp_term): allgather's all-gather of K, V and reduce-scatter of
              dK, dV every layer, exposed; ring's K/V hops behind its attention blocks (with the fp32
              dK/dV accumulators in the backward), exposed where a hop outlasts a block, plus the
              accumulator's last hop home. Every per-token term runs over the rank's T/cp tokens and
              the attention core is attention_term (1/cp of all T x T pairs per rank: the mask is a
              tensor, so no causal tile is skipped, as at cp = 1 with data.document_mask; the ring's
              matmuls at the fp32 rate)
  ep          expert parallelism (ep_term): every MoE layer's dispatch and combine all-to-alls of the
              N x top_k routed rows (C values each, the compute dtype; forward, and again in the
              backward, and once more for full recompute's forward), the share leaving each rank
              over NVLink or the NIC as the ep group is placed, exposed (the code waits for each);
              MoE blocks' FLOPs are their active FLOPs (the top_k experts, model/counts.mlp_flops)
              averaged over the model's blocks, plus the routing's gather / weighting / scatter
              passes over the rows as HBM traffic
  pp          point-to-point per action (messages in the compute dtype); the bubble from simulate()
              with those chunk times
  dp / zero   over dp x cp (where gradients are reduced and ZeRO shards): the fp32 main gradients'
              all-reduce (no ZeRO) or reduce-scatter (ZeRO-1 once; ZeRO-2 and -3 every micro-batch),
              the all-gather of the updated weights in the compute dtype (ZeRO-3: each block's
              before its forward and its backward, every micro-batch). OURS
              (native backends, parallel.overlap_grad_reduce / overlap_param_gather) overlaps them
              as the code does (dp_overlap: the reduction behind the rest of the backward, the
              gathers behind the next forward, ZeRO-3 one block ahead): only what does not fit is
              exposed; overlap_*=false, DeepSpeed and MEGATRON_2021 (whose 2021 code all-reduced
              after the backward) run them all after the backward (dp_term). Every stage's over
              its own parameters (dp_stages): what a stage runs at the step's boundary is exposed
              only past the pipeline's stagger (stage s ends its backward s actions before stage
              0 and starts its forward s actions after it). Then the tied
              embedding's sync between first and last stage and the AdamW step (and the
              main-gradient accumulation) as memory traffic

Timing.exposed gives the exposed seconds per kind, Timing.overlapped names the overlapped terms.
TFLOP/s per GPU are hardware FLOPs (recompute included: what Narayanan et al. report), MFU model
FLOPs (model/counts.py, the trainer's definition). The one calibrated constant is GEMM_EFFICIENCY.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from ..config import ModelConfig
from ..distributed.topology import Topology
from ..layout import Layout
from ..model.counts import layer_flops, mlp_flops, model_flops
from ..optim.distributed import lookup_rows_travel
from ..slicing import padded_vocab
from .cluster import GB, MEGATRON_2021, OURS, Cluster, Profile, all_to_all_time, collective_time, p2p_time
from .stage import MAX_STAGING_BUCKETS, chunks_of, rank_params, schedule_time

# The one calibrated constant: the fraction of the bf16 tensor-core peak a transformer GEMM reaches.
# Fitted on row 1 of Narayanan et al. 2021, Table 1 (1.7B, tp=pp=1, 32 A100s: 137 TFLOP/s per GPU)
# with the MEGATRON_2021 profile, then checked on every other row (plan/calibration.py).
GEMM_EFFICIENCY = 0.61


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
    profile: str = OURS.name
    # exposed seconds per step by kind (tp/sp collectives, pipeline p2p, dp/ZeRO, tied embedding)
    # and the dp/ZeRO collective seconds that ran behind compute; `overlapped` names those terms
    exposed: dict = field(default_factory=dict)
    dp_hidden_s: float = 0.0
    overlapped: tuple = ()
    cp_hidden_s: float = 0.0  # ring attention's K/V hops that ran behind its blocks

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.step_s if self.step_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "comm_share": self.comm_share}


@dataclass(frozen=True)
class Step:
    """One micro-batch of `layout` on `cluster`: the shape and rates every term reads."""
    layout: Layout
    cluster: Cluster
    profile: Profile
    peak: float  # achievable GEMM FLOP/s
    e: int  # bytes of the compute dtype
    vocab: int  # this tp rank's vocabulary slice
    autocast: bool  # DeepSpeed's bf16: fp32 module inputs, bf16 GEMMs (the native backends hold bf16 weights)

    @classmethod
    def of(cls, layout: Layout, cluster: Cluster, profile: Profile, gemm_efficiency: float) -> "Step":
        cfg = layout.config
        mega = profile is MEGATRON_2021
        vocab = cfg.model.vocab_size // layout.tp if mega else \
            padded_vocab(cfg.model.vocab_size, layout.tp, cfg.parallel.make_vocab_divisible_by) // layout.tp
        bf16 = cfg.train.precision == "bf16"
        return cls(layout, cluster, profile, cluster.peak_tflops * 1e12 * gemm_efficiency,
                   2 if bf16 or mega else 4, vocab, bf16 and layout.backend == "deepspeed" and not mega)

    @property
    def message_bytes(self) -> int:
        """Bytes per element of a pipeline message (the engine's dtype: fp32 under DeepSpeed)."""
        return 4 if self.layout.backend == "deepspeed" and self.profile is not MEGATRON_2021 else self.e

    @property
    def mc(self) -> ModelConfig:
        return self.layout.config.model

    @property
    def b(self) -> int:
        return self.layout.config.data.micro_batch_size

    @property
    def s(self) -> int:
        """The whole sequence (what attention's keys span)."""
        return self.layout.config.seq_length

    @property
    def local(self) -> int:
        """This rank's tokens of each sequence: T / cp (every per-token term scales with it)."""
        return self.layout.config.seq_length // self.layout.cp

    @property
    def recompute(self) -> str:
        return self.layout.config.train.recompute

    @property
    def hbm(self) -> float:
        return self.cluster.hbm_gbps * GB

    def ranks(self, dim: str) -> list[int]:
        """The first group of parallel dimension `dim` (tp, cp, pp or dp): placement by rank id."""
        return first_group(self.layout.topology, dim)

    def replica_ranks(self) -> list[int]:
        """The first dp x cp group: where gradients are reduced and ZeRO shards (the cp ranks of a
        replica hold the same weights; train/backends hands the optimizer the dp_cp group)."""
        return first_group(self.layout.topology, "dp", "cp")


def first_group(topo, *dims: str) -> list[int]:
    """The ranks of the group spanning `dims` whose other coordinates are all 0, by the topology's
    own rank_of: one group's worth of work. (Topology.group_ranks lists every group, world-size
    rank_of calls; at 16,384 GPUs that made each planned layout cost ~45 ms per call.) Cached per
    shape: a plan asks for the same groups of thousands of candidates."""
    return list(_first_group(topo.tp, topo.cp, topo.pp, topo.dp, "-".join(topo.order), dims))


@lru_cache(maxsize=4096)
def _first_group(tp: int, cp: int, pp: int, dp: int, order: str, dims: tuple[str, ...]) -> tuple[int, ...]:
    topo = Topology(tp, pp, dp, order, cp)
    return tuple(topo.rank_of(**dict(zip(dims, coord, strict=True)))
                 for coord in itertools.product(*(range(topo.sizes[d]) for d in dims)))


def _elementwise_bytes(mc: ModelConfig, tp: int, sp: bool, b: int, s: int, e: int, prof: Profile,
                       autocast: bool = False) -> float:
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
    # this code: every op is its own kernel; the residual stream and norms in the compute dtype
    # (fp32 under DeepSpeed's autocast, which also casts the norm outputs to bf16)
    r = 4 if autocast else e
    norms = 2 * 2 * r * h / ts  # read + write
    casts = 2 * (4 + 2) * h if autocast else 0
    adds = 2 * (r + e + r) * h / ts  # residual adds
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


def _core_flops(mc: ModelConfig, b: int, queries: int, keys: int) -> float:
    """Forward FLOPs of the attention core (q k^T and the weighted sum of v) over every (query, key)
    pair, all heads."""
    return 4 * b * queries * keys * mc.num_attention_heads * mc.head_dim


def causal_share(st: Step) -> float:
    """The share of all T x T (query, key) pairs SDPA computes at cp = 1: half under is_causal with
    the flash kernel (OURS: it skips the masked tiles), all of them under a mask tensor (packed
    documents: the mask is data, so no tile is skipped; on CUDA flash takes no mask and the
    memory-efficient kernel computes every pair) or with materialised scores (MEGATRON_2021)."""
    docs = st.layout.config.data.document_mask
    return 0.5 if st.profile.flash_attention and not docs else 1.0


def attention_term(st: Step) -> tuple[float, float]:
    """Seconds of one block's attention core (forward, backward) on one rank.

    cp = 1: SDPA with is_causal (the flash kernel skips the masked half under the OURS profile), or
    under the packed documents' additive mask, every pair (causal_share).
    cp > 1: load balancing gives every rank 1/cp of the attention (chunks r and 2cp-1-r), but both
    algorithms compute all T/cp x T (query, key) pairs of the rank, not the causal half of them:
      allgather  one SDPA under the (B|1, 1, T/cp, T) additive mask, which is data to the kernel (no
                 tile is skipped; the memory-efficient / cuDNN kernels take masks, flash does not),
                 at the GEMM efficiency (a document mask is built once per chunk-forward: mask_term)
      ring       cp blocks of T/cp x T/cp, none fully masked under the load-balanced layout, by
                 torch.matmul in fp32 (context_parallel._probs: at least fp32, so the GPU's fp32
                 rate, torch's default being no TF32), the backward five matmuls per block to the
                 forward's two; and the fp32 (B, H, T/cp, T/cp) scores written and read by the
                 element-wise ops around them (counted from the code: ~44 bytes per score in the
                 forward - matmul out, scale, adding the mask, logsumexp, subtract, exp - and ~60 in
                 the backward, which recomputes them and forms dP and dS)"""
    mc, b, s, tp, cp = st.mc, st.b, st.s, st.layout.tp, st.layout.cp
    if cp == 1:
        gemm = _core_flops(mc, b, s, s) * causal_share(st) / tp / st.peak
        return gemm, 2 * gemm
    pairs = b * st.local * s * mc.num_attention_heads / tp  # (query, key) pairs on this rank, all heads
    if st.layout.config.parallel.cp_algorithm == "allgather":
        gemm = _core_flops(mc, b, st.local, s) / tp / st.peak
        return gemm, 2 * gemm
    fp32 = st.peak * st.cluster.fp32_tflops / st.cluster.peak_tflops  # at the same GEMM efficiency
    flops = _core_flops(mc, b, st.local, s) / tp
    return flops / fp32 + 44 * pairs / st.hbm, 2.5 * flops / fp32 + 60 * pairs / st.hbm


def mask_term(st: Step) -> float:
    """Seconds of building one chunk-forward's additive document mask (memory traffic), which every
    block of the chunk then reads as it is: none without packed documents (is_causal at cp = 1).
    Per (query, key) element of the (B|1, 1, T/cp, T) mask (memory.attention_mask_bytes), from the
    code: model/gpt.additive_mask writes zeros (e), inverts the bool mask (read 1, write 1) and
    masked_fill_s in place (read 1 + e, write e): 3 + 3e bytes; at cp = 1 Documents.attention first
    compares the segments (write 1) and ands that with the causal mask (read 2, write 1): 4 more.
    (ContextShard's bool mask is built once per micro-batch when the step's batch is sharded.) None
    under cp without documents either: the rank's one shared mask is built once for the run
    (parallel/context_parallel.ContextSharder)."""
    if not st.layout.config.data.document_mask:
        return 0.0
    per_element = 3 + 3 * st.e + (4 if st.layout.cp == 1 else 0)
    return st.b * st.local * st.s * per_element / st.hbm


def compute_term(st: Step) -> tuple[float, float, float, float]:
    """Seconds of (block forward, block backward, head forward, head backward) for one micro-batch on
    one tp rank, without communication; the block's backward includes what recompute repeats. Every
    per-token term runs over the rank's T/cp tokens; the attention core is attention_term."""
    mc, b, n, tp = st.mc, st.b, st.local, st.layout.tp
    # projections and MLP (MoE: the blocks' mean, each MoE block its active experts); a MoE block
    # runs whole on every tp rank (its experts are split by ep instead), under SP on its 1/tp tokens
    sp = st.layout.sequence_parallel
    dense = (sum(_block_flops(mc, b, n, i, tp, sp) for i in range(mc.num_layers)) / mc.num_layers
             - _core_flops(mc, b, n, n) / tp) / st.peak
    core_f, core_b = attention_term(st)
    elem = (_elementwise_bytes(mc, tp, sp, b, n, st.e, st.profile, st.autocast)
            + _routing_bytes(mc, b * n // (tp if sp else 1), st.e)) / st.hbm
    fwd, bwd = dense + core_f + elem, 2 * dense + core_b + 2 * elem
    if st.recompute == "full":
        bwd += fwd
    elif st.recompute == "selective" and st.layout.cp == 1:  # the attention core again (under cp the
        # core is never checkpointed: Layout refuses dropout, the one case the model recomputes it)
        bwd += _core_flops(mc, b, n, n) / tp / st.peak * causal_share(st)
    N, h, vocab = b * n, mc.hidden_size, st.vocab
    head_gemm = 2 * N * h * vocab / st.peak
    ce_bytes = 12 * N * vocab * 4 + 2 * vocab * h * 4  # softmax passes + the embedding's dense gradient
    return fwd, bwd, head_gemm + ce_bytes / 3 / st.hbm, 2 * head_gemm + 2 * ce_bytes / 3 / st.hbm


def _block_flops(mc: ModelConfig, b: int, n: int, layer: int, tp: int, sp: bool = False) -> float:
    """Forward FLOPs of block `layer` on one tp rank: the attention and a dense MLP split over tp, a
    MoE MLP whole on every tp rank (under SP over the rank's 1/tp of the tokens)."""
    if not mc.moe.is_moe(layer):
        return layer_flops(mc, b, n, layer=layer) / tp
    moe = mlp_flops(mc, b * n, layer)
    return (layer_flops(mc, b, n, layer=layer) - moe) / tp + (moe / tp if sp else moe)


def _routing_bytes(mc: ModelConfig, N: int, e: int) -> float:
    """Per block on average (MoE blocks' share of the model): the bytes the routing moves besides the
    GEMMs, forward: the rows gathered per expert (read N C, write M C), weighted (read and write M C)
    and scattered back (read M C, write N C), M = N x top_k."""
    m = mc.moe
    if not m.num_experts:
        return 0.0
    M = N * m.top_k
    moe_share = sum(m.is_moe(i) for i in range(mc.num_layers)) / mc.num_layers
    return moe_share * (2 * N + 4 * M) * mc.hidden_size * e


def ep_term(st: Step) -> tuple[float, float]:
    """Seconds of one micro-batch's expert-parallel all-to-alls per block on average (MoE blocks'
    share of the model): (forward, backward including what full recompute repeats). Each of the
    dispatch and the combine sends the N x top_k routed rows; (ep - 1) / ep of them leave the rank."""
    mc, layout = st.mc, st.layout
    if layout.ep == 1 or not mc.moe.num_experts:
        return 0.0, 0.0
    rows = st.b * st.local * mc.moe.top_k // (layout.tp if layout.sequence_parallel else 1)  # SP: its shard's
    ranks = st.replica_ranks()[:layout.ep]  # the first ep group: consecutive ranks of dp x cp
    one = all_to_all_time(rows * mc.hidden_size * st.e, ranks, st.cluster)
    moe_share = sum(mc.moe.is_moe(i) for i in range(mc.num_layers)) / mc.num_layers
    fwd = 2 * one * moe_share
    return fwd, 2 * fwd if st.recompute == "full" else fwd


def tp_term(st: Step) -> tuple[float, float, float]:
    """Seconds of one micro-batch's tensor-parallel collectives on one rank: (a block's forward, a
    block's backward including what full recompute repeats, the embedding + vocab-parallel loss)."""
    tp = st.layout.tp
    if tp == 1:
        return 0.0, 0.0, 0.0
    ranks, c = st.ranks("tp"), st.cluster
    N, h, e = st.b * st.local, st.mc.hidden_size, st.e
    act = N * h * e
    wide = N * h * (4 if st.autocast else e)  # under autocast the norms' outputs (and their grads) are fp32
    gather = collective_time(act, ranks, c, "gather")  # an all-gather or a reduce-scatter of (b, s, h)
    if st.layout.sequence_parallel:
        # forward: all-gather before QKV and FC1, reduce-scatter after proj and FC2; backward: their
        # conjugates (2 reduce-scatters + 2 all-gathers) and the QKV / FC1 inputs gathered again
        fwd, bwd = 4 * gather, 6 * gather
        # embedding: scatter (an all-gather in backward) after its all-reduce; LM head: all-gather
        # forward, reduce-scatter + all-gather again backward
        head = collective_time(act, ranks, c) + 4 * gather
    else:
        fwd = 2 * collective_time(act, ranks, c)
        bwd = 2 * collective_time(wide, ranks, c)
        head = 2 * collective_time(wide, ranks, c)  # embedding forward, head input backward
    if st.recompute == "full":
        bwd += fwd
    head += 3 * collective_time(N * 4, ranks, c)  # vocab-parallel CE: max, sum of exps, target logit
    return fwd, bwd, head


@dataclass(frozen=True)
class ContextComm:
    """One block's context-parallel communication on one rank, in seconds."""
    fwd: float = 0.0  # exposed in the block's forward
    bwd: float = 0.0  # exposed in its backward (full recompute's forward again included)
    hidden: float = 0.0  # ring hops that ran behind the attention blocks (forward + backward)


def cp_term(st: Step, core_f: float, core_b: float) -> ContextComm:
    """Context parallelism's messages per block, on the link the cp group spans (placement by rank
    id: cp right after tp in the default order, so with tp = 8 each cp rank is on another node).

      allgather  all-gather K and V (B, K/tp, T, D) in the compute dtype before the attention,
                 reduce-scatter dK and dV in its backward: synchronous collectives, all exposed
      ring       forward: cp - 1 hops of this rank's (2, B, K/tp, T/cp, D) K/V block to the next
                 rank, each in flight while the current block is computed (exposed only where a hop
                 outlasts a block: core_f / cp); backward: per step the K/V block and the fp32
                 dK/dV accumulator of the same shape travel together behind that step's block
                 (core_b / cp), then one last hop of the accumulator home, exposed"""
    layout, c = st.layout, st.cluster
    cp = layout.cp
    if cp == 1:
        return ContextComm()
    ranks = st.ranks("cp")
    kv = st.b * st.mc.num_kv_heads // layout.tp * st.mc.head_dim * st.e  # one token of K (or V), bytes
    again = st.recompute == "full"  # the recomputed forward exchanges its keys again
    if layout.config.parallel.cp_algorithm == "allgather":
        gather = 2 * collective_time(kv * st.s, ranks, c, "gather")  # K and V
        return ContextComm(gather, gather * (2 if again else 1))

    def hop(nbytes: float) -> float:  # the slowest neighbour pair of the ring
        return max(p2p_time(nbytes, ranks[i], ranks[(i + 1) % cp], c, layout.tp, False) for i in range(cp))
    block = 2 * kv * st.local  # (2, B, K/tp, T/cp, D)
    acc = block * max(4, st.e) / st.e  # the dK/dV accumulator: at least fp32 (_wide)
    f_hop, b_hop, home = hop(block), hop(block + acc), hop(acc)
    f_exposed = (cp - 1) * max(0.0, f_hop - core_f / cp)
    b_exposed = (cp - 1) * max(0.0, b_hop - core_b / cp) + home
    hidden = (cp - 1) * (f_hop + b_hop) - f_exposed - (b_exposed - home)
    return ContextComm(f_exposed, b_exposed + (f_exposed if again else 0.0),
                       hidden + ((cp - 1) * f_hop - f_exposed if again else 0.0))


@dataclass(frozen=True)
class Pipe:
    time: float  # seconds of all micro-batch chunks on the busiest stage, bubble included
    bubble: float
    chunks: int  # chunk-micro-batches each stage runs
    p2p: float  # seconds of one point-to-point action as exposed


def pp_term(st: Step, f_chunk: float, b_chunk: float) -> Pipe:
    """The pipeline around chunks taking f_chunk / b_chunk seconds (communication-free here): p2p per
    action, the schedule's bubble from the simulator."""
    layout, c, profile = st.layout, st.cluster, st.profile
    pp, m, v = layout.pp, layout.micro_batches, layout.config.parallel.virtual_stages
    if pp == 1:
        return Pipe(m * (f_chunk + b_chunk), 0.0, m, 0.0)
    tp, sp = layout.tp, layout.sequence_parallel
    msg = st.b * (st.local // tp if sp else st.local) * st.mc.hidden_size * st.message_bytes
    ranks = st.ranks("pp")
    p2p = max(p2p_time(msg, ranks[i], ranks[i + 1], c, tp, profile.scatter_gather) for i in range(pp - 1))
    if profile.p2p_overlap:  # the receive was posted one action ahead: only its latency shows
        latency = c.inter_latency_us if c.nodes > 1 else c.intra_latency_us
        p2p = min(p2p, latency * 1e-6)
    f_chunk += p2p
    b_chunk += p2p
    ratio = max(0.25, round(b_chunk / f_chunk * 4) / 4)  # a few shapes to simulate, cached
    finish, bubble = schedule_time(layout.config.parallel.schedule, pp, m, v, ratio)
    busy = m * v * (f_chunk + b_chunk)
    return Pipe(max(busy, finish * (f_chunk + b_chunk) / (1 + ratio)), bubble, m * v, p2p)


def dp_term(st: Step, n_rank: int, grads: bool = True, params: bool = True) -> float:
    """Seconds of the data-parallel synchronisation run after the pipeline, not overlapped: the
    gradient reduction (`grads`) and ZeRO's parameter traffic (`params`) over `n_rank` parameters.
    (What the Megatron-2021 profile, DeepSpeed and overlap_*=false get; dp_overlap the rest.)"""
    layout, c = st.layout, st.cluster
    zero = layout.config.optim.zero.stage
    ranks = st.replica_ranks()  # dp x cp
    grad_bytes = 4 * n_rank  # fp32 (main) gradients
    t = 0.0
    if len(ranks) == 1:
        return t
    if layout.backend == "deepspeed":
        t += 1.5 * collective_time(grad_bytes, ranks, c)  # reduce-scatter + all-gather
        if zero == 3:  # gather parameters for every forward and backward, no prefetch
            gathers = layout.micro_batches * (3 if st.recompute == "full" else 2)
            t += gathers * collective_time(n_rank * st.e, ranks, c, "gather")
        return t
    if grads:
        if zero == 0:
            t += collective_time(grad_bytes, ranks, c)
        elif zero == 1:  # the distributed optimizer: reduce-scatter fp32 grads once
            t += collective_time(grad_bytes, ranks, c, "gather")
        else:  # native ZeRO-2/3 reduce-scatter each micro-batch's gradients during its backward
            t += layout.micro_batches * collective_time(grad_bytes, ranks, c, "gather")
    if params:
        if zero in (1, 2):  # all-gather the new weights once
            t += collective_time(st.e * n_rank, ranks, c, "gather")
        elif zero == 3:  # ZeRO-3: gather each block before its forward and again before its backward
            t += 2 * layout.micro_batches * collective_time(st.e * n_rank, ranks, c, "gather")
    return t


def tied_term(st: Step) -> float:
    """The tied embedding's gradient all-reduce between first and last stage, after the backward."""
    layout = st.layout
    if layout.pp > 1 and st.mc.tie_embeddings:
        pp_ranks = st.ranks("pp")
        return collective_time(st.vocab * st.mc.hidden_size * 4, [pp_ranks[0], pp_ranks[-1]], st.cluster)
    return 0.0


def sp_moe_term(st: Step) -> float:
    """Sequence-parallel MoE (parallel/tensor_parallel.shard_moe_tokens): after the data-parallel
    reduction, the MoE MLPs' fp32 gradients are summed over tp (sync_sequence_parallel_grads), each
    rank's shard of them under the distributed optimizer (experts over their own replicas). Not
    overlapped: it runs with the norms' in the optimizer's finish."""
    layout = st.layout
    if not (layout.sequence_parallel and st.mc.moe.num_experts):
        return 0.0
    dp, zero = layout.dp * layout.cp, layout.config.optim.zero.stage
    worst = 0.0
    for s in range(layout.pp):
        rp = rank_params(layout, s)
        moe, experts = rp.moe_mlp, rp.experts
        if zero >= 1:  # the shards: dense MoE parameters over dp x cp, the experts over their replicas
            moe = (moe - experts) / dp + experts * layout.ep / dp
        worst = max(worst, moe)
    return collective_time(4 * worst, st.ranks("tp"), st.cluster)


def optimizer_term(st: Step, n_rank: int) -> float:
    """Seconds of the AdamW step (and clipping, bucketing) as memory traffic; the distributed
    optimizer (bf16, or dp > 1 on the native backend) also adds each micro-batch's gradient
    into the fp32 main gradients (read it, read + write fp32) and rounds the masters into the weights."""
    layout = st.layout
    zero, dp = layout.config.optim.zero.stage, layout.dp * layout.cp  # the optimizer shards over dp x cp
    # the experts this rank holds shard over the ranks holding the same ones (dp x cp / ep)
    experts = max(rank_params(layout, s).experts for s in range(layout.pp))
    stepped = (n_rank - experts) / dp + experts * layout.ep / dp if zero >= 1 else n_rank
    t = st.profile.optimizer_bytes_per_param * stepped / st.hbm
    if zero >= 1:
        t += 16 * n_rank / st.hbm  # clipping and bucketing still touch every gradient
    native = layout.backend != "deepspeed" and st.profile is not MEGATRON_2021
    if native and (st.e == 2 or zero >= 1 or dp > 1):  # the distributed optimizer (make_optimizer)
        t += layout.micro_batches * (st.e + 8) * n_rank / st.hbm + st.e * n_rank / st.hbm
    return t


@dataclass(frozen=True)
class Overlap:
    """The data-parallel / ZeRO collectives of the native backends as the code overlaps them: what
    they add to each chunk action, what is left after the pipeline, what ran behind compute."""
    f_add: float = 0.0  # seconds added to each forward chunk action (ZeRO-3 gathers not hidden)
    b_add: float = 0.0  # ... to each backward chunk action (gathers, reductions the link holds back)
    tail: float = 0.0  # exposed after the stage's last backward: the reduction's tail, the lookup
    lead: float = 0.0  # exposed before its next forward: the first parameter buckets' all-gather
    hidden: float = 0.0  # collective seconds that ran behind compute
    overlapped: tuple[str, ...] = ()  # which terms were overlapped (plan's output names them)


def _stage_buckets(st: Step, stage: int) -> list[int]:
    """The busiest stage's buckets (elements, backward order) as optim/distributed.py cuts them."""
    from .memory import buckets, zero3_buckets  # memory imports nothing from here; kept local anyway
    z = st.layout.config.optim.zero.stage
    return zero3_buckets(st.layout, stage)[0][::-1] if z == 3 else buckets(st.layout, stage)


def lookup_term(st: Step, stage: int) -> float:
    """Seconds of one gathered embedding-lookup gradient on a rank of `stage` (optim/distributed.py's
    DeferredLookup): the ids (int64) and the output-gradient rows of the micro-batch's b x s/cp
    tokens, all-gathered over dp x cp; 0 without data parallelism, DeepSpeed, or the embedding, and
    where the table is the smaller transfer (lookup_rows_travel: then reduced with its bucket)."""
    layout = st.layout
    if layout.dp * layout.cp == 1 or layout.backend == "deepspeed" or st.profile is MEGATRON_2021:
        return 0.0
    if not any(c.first for c in chunks_of(layout, stage)):
        return 0.0
    tokens = st.b * st.local
    rows = padded_vocab(st.mc.vocab_size, layout.tp,
                        layout.config.parallel.make_vocab_divisible_by) // layout.tp  # this rank's table
    if not lookup_rows_travel(layout.dp * layout.cp, tokens, rows):  # dense: reduced with its bucket
        return 0.0
    return collective_time(tokens * (8 + st.mc.hidden_size * st.e), st.replica_ranks(), st.cluster, "gather")


def _tied_here(st: Step, stage: int) -> bool:
    """The stage holds the embedding and a head tied to it: the bucket of the weight then holds only
    the head's gradient, complete at the start of the backward (the lookup's travels apart)."""
    chunks = chunks_of(st.layout, stage)
    return st.mc.tie_embeddings and any(c.first for c in chunks) and any(c.last for c in chunks)


def dp_overlap(st: Step, stage: int, f_block: float, b_block: float, f_chunk: float,
               b_chunk: float) -> Overlap:
    """The native backends' data-parallel traffic with parallel.overlap_grad_reduce /
    overlap_param_gather, on the rank of `stage` (its buckets), around chunk actions of
    f_chunk / b_chunk seconds holding blocks of f_block / b_block seconds:

      grads, ZeRO-0/1  each bucket's all-reduce / reduce-scatter starts once its last gradient of the
                       step's last micro-batch arrives, in order, unbounded; waited for before
                       clipping. The stage's last backward of each chunk is what hides them (with
                       interleaving chunk j's last backward comes pp backward actions before chunk
                       j-1's): a FIFO on the link, the tail past the stage's end exposed (at least the
                       last bucket: the first layers and the embedding)
      grads, ZeRO-2/3  every micro-batch's backward reduce-scatters its buckets as they fill, at most
                       MAX_STAGING_BUCKETS staging buckets alive (the filling one included: a bucket's
                       first gradient waits for the reduction two buckets back), and the end of every
                       backward (each pipeline B action) waits for all of them, as FSDP does: per
                       action at least its last bucket's reduce-scatter is exposed, more where the
                       link is slower than the backward (backward_with_reductions)
      lookup           the embedding lookup's gradient rows of a reduced backward (lookup_term),
                       gathered at the backward's end: after the stage's last backward (ZeRO-0/1),
                       after each (ZeRO-2/3). A tied weight's bucket, when it holds that weight alone,
                       is complete once the head's backward is and leads the FIFO (ZeRO-0/1)
      params, ZeRO-1/2 after the step each bucket's all-gather starts in forward order and is waited
                       for just before its first use: exposed is how far the gathers run ahead of the
                       first micro-batch's forward through the stage's chunks (at least the first)
      params, ZeRO-3   the next block's gather starts when a block starts: per chunk action (forward
                       and backward, every micro-batch) the first block's gather is exposed and each
                       further one only where it outlasts the block before it

    Not modelled: the dp link shared between ZeRO-3's gathers and its reduce-scatters, and compute
    slowed by the collectives' own kernels (both make this optimistic)."""
    layout, c = st.layout, st.cluster
    cfg = layout.config
    zero, pp, m, v = cfg.optim.zero.stage, layout.pp, layout.micro_batches, cfg.parallel.virtual_stages
    ranks = st.replica_ranks()  # dp x cp
    sizes = _stage_buckets(st, stage)
    per_chunk = max(1, len(sizes) // v)  # buckets filled by one chunk action (chunks hold equal loads)
    f_add = b_add = tail = lead = hidden = 0.0
    overlapped = []
    lookup = lookup_term(st, stage)
    if cfg.parallel.overlap_grad_reduce:
        kind = "all_reduce" if zero == 0 else "gather"
        order = list(sizes)
        emb = padded_vocab(st.mc.vocab_size, layout.tp, cfg.parallel.make_vocab_divisible_by) // layout.tp \
            * st.mc.hidden_size
        head_first = zero <= 1 and lookup and _tied_here(st, stage) and order and order[-1] == emb
        if head_first:
            order = [order[-1]] + order[:-1]  # the head's part, ready as the backward starts
        costs = [collective_time(4 * n, ranks, c, kind) for n in order]  # fp32 main gradients
        total = sum(costs)
        if zero <= 1:
            # chunk k (k = 0: the first whose last backward runs) ends (v-1-k) gaps before the stage
            gap = pp * b_chunk if v > 1 else 0.0
            end, done = 0.0, -math.inf
            for k in range(v):
                start = -(v - 1 - k) * gap - b_chunk
                # the chunk's first bucket is full (the tied head's at once: pp = 1, one chunk)
                first_ready = start + (0.0 if head_first else b_chunk / per_chunk)
                mine = costs[k * per_chunk:(k + 1) * per_chunk if k < v - 1 else None]
                done = max(done, first_ready) + sum(mine)
                done = max(done, start + b_chunk + mine[-1]) if mine else done
            left = max(done - end, costs[-1])
            tail += left + lookup
            hidden += total - left
            overlapped.append("all-reduce" if zero == 0 else "reduce-scatter")
        else:
            # every action: the chunk's buckets as its backward fills them; the chunks' mean (what
            # they add to the stage's busy time, spread over its actions: one chunk may hold a
            # bucket far larger than a block's, the embedding's)
            held = sum(backward_with_reductions(b_chunk, costs[k * per_chunk:(k + 1) * per_chunk
                                                                if k < v - 1 else None]) - b_chunk
                       for k in range(v)) / v
            b_add += held + lookup / v  # (the first chunk's backward gathers it; spread over the chunks)
            hidden += m * total - m * v * held
            overlapped.append("reduce-scatter (every micro-batch)")
    if cfg.parallel.overlap_param_gather and zero >= 1:
        gathers = [collective_time(st.e * n, ranks, c, "gather") for n in sizes[::-1]]  # forward order
        if zero in (1, 2):
            # chunk j's first forward starts j x pp forward actions into the step (interleaving's
            # warm-up runs pp micro-batches of each chunk in turn); its buckets are needed within it
            ahead, done = gathers[0], 0.0
            for j in range(v):
                mine = gathers[j * per_chunk:(j + 1) * per_chunk if j < v - 1 else None]
                done += sum(mine)
                needed = j * pp * f_chunk + f_chunk - (mine[-1] if mine else 0.0)
                ahead = max(ahead, done - needed)
            lead += ahead
            hidden += sum(gathers) - ahead
            overlapped.append("all-gather (next forward)")
        else:
            g = max(gathers)  # a block's (or the rest's) full weights
            blocks = max(1, (len(sizes) - 1) // v)
            passes = 2 + (1 if st.recompute == "full" else 0)  # forward, backward (and its recompute)
            f_g = g + (blocks - 1) * max(0.0, g - f_block)
            # the backward gathers again (and again for full recompute's forward inside it)
            b_g = (passes - 1) * g + (blocks - 1) * max(0.0, g - b_block)
            f_add += f_g
            b_add += b_g
            hidden += m * v * (passes * blocks * g - f_g - b_g)
            overlapped.append("all-gather (one block ahead)")
    return Overlap(f_add, b_add, tail, lead, max(0.0, hidden), tuple(overlapped))


def backward_with_reductions(b_chunk: float, costs: list[float]) -> float:
    """Seconds of one ZeRO-2/3 backward action of b_chunk compute seconds whose buckets (filled in
    equal shares of it, in order) reduce-scatter for `costs` seconds each on one link, as
    optim/distributed.py runs them: bucket i's first gradient creates its staging bucket, which first
    waits until at most MAX_STAGING_BUCKETS - 1 reductions are in flight (bucket i - 2's done); its
    reduction starts once it is full and the link is free; the backward's end waits for the last."""
    if not costs:
        return b_chunk
    c = b_chunk / len(costs)
    done = [-math.inf] * MAX_STAGING_BUCKETS  # the reductions in flight, oldest first
    computed = 0.0
    for cost in costs:
        computed = max(computed, done[-MAX_STAGING_BUCKETS]) + c
        done.append(max(computed, done[-1]) + cost)
    return max(computed, done[-1])


@dataclass(frozen=True)
class DataParallel:
    """The step's data-parallel / ZeRO collectives over every pipeline stage (dp_stages)."""
    f_add: float  # added to each forward chunk action (the slowest stage's)
    b_add: float  # ... to each backward chunk action
    after: float  # exposed outside the pipeline's actions, around the step's boundary
    hidden: float  # collective seconds that ran behind compute (the stage hiding the most)
    overlapped: tuple[str, ...]


def dp_stages(st: Step, totals: list[int], f_block: float, b_block: float, f_chunk: float,
              b_chunk: float) -> DataParallel:
    """Every stage's data-parallel collectives, each over its own parameters (`totals`, per stage):
    dp_overlap's where the code overlaps them, dp_term's (and the lookup's) where it runs them after
    the backward. The pipeline staggers the stages: stage s's last backward ends about s backward
    actions before stage 0's (the flush runs from the last stage down), and its next forward starts
    about s forward actions after stage 0's, so what a stage runs at the step's boundary (ZeRO-0/1's
    reduction after its last backward, ZeRO-1/2's all-gather before its first forward) is exposed
    only past that slack: a stage with more parameters than stage 0 may still hide them, and stage
    0's own (the embedding's bucket, the lookup's rows) is never missed. What runs in every
    micro-batch (ZeRO-2/3) and the chunk actions' additions are the slowest stage's. DeepSpeed's
    (no pipeline overlap modelled): the largest stage's dp_term, after the pipeline."""
    layout = st.layout
    par, zero, m = layout.config.parallel, layout.config.optim.zero.stage, layout.micro_batches
    if layout.backend == "deepspeed":
        return DataParallel(0.0, 0.0, dp_term(st, max(totals)), 0.0, ())
    overlap = st.profile.dp_overlap and layout.dp * layout.cp > 1
    grads = params = inside = 0.0  # at the step's end, at its start, within it (the worst stage's)
    f_add = b_add = hidden = 0.0
    named: tuple[str, ...] = ()
    seen: dict[tuple, tuple[float, ...]] = {}
    for s, n in enumerate(totals):
        chunks = chunks_of(layout, s)
        key = (n, any(c.first for c in chunks), any(c.last for c in chunks))  # equal stages: one pass
        if key not in seen:
            ov = dp_overlap(st, s, f_block, b_block, f_chunk, b_chunk) if overlap else Overlap()
            # what the overlap model does not cover runs after the backward, as dp_term counts it
            after_grads = not ov.overlapped or not par.overlap_grad_reduce
            after_params = not (ov.overlapped and par.overlap_param_gather and zero >= 1)
            g = dp_term(st, n, grads=after_grads, params=False)
            p = dp_term(st, n, grads=False, params=after_params)
            lookup = lookup_term(st, s) if after_grads else 0.0  # each waited for
            if zero <= 1:
                end, within = ov.tail + g + lookup, 0.0
            else:  # every backward's reduce-scatter (and lookup gather)
                end, within = ov.tail, g + m * lookup
            start, within = (ov.lead + p, within) if zero in (1, 2) else (ov.lead, within + p)
            seen[key] = (end, start, within, ov.f_add, ov.b_add, ov.hidden)
            named = named or ov.overlapped
        end, start, within, fa, ba, hid = seen[key]
        grads = max(grads, end - s * b_chunk)
        params = max(params, start - s * f_chunk)
        inside, f_add, b_add, hidden = max(inside, within), max(f_add, fa), max(b_add, ba), max(hidden, hid)
    return DataParallel(f_add, b_add, grads + params + inside, hidden, named)


def step_time(layout: Layout, cluster: Cluster, profile: Profile = OURS,
              gemm_efficiency: float = GEMM_EFFICIENCY) -> Timing:
    """Predicted time of one optimizer step of `layout` on `cluster`."""
    st = Step.of(layout, cluster, profile, gemm_efficiency)
    f, b, head_f, head_b = compute_term(st)
    tp_f, tp_b, head_comm = tp_term(st)
    ctx = cp_term(st, *attention_term(st))
    ep_f, ep_b = ep_term(st)
    # a block's exposed communication: tensor-, context- and expert-parallel, all inside the blocks
    tp_f, tp_b, tp_only = tp_f + ctx.fwd + ep_f, tp_b + ctx.bwd + ep_b, tp_f + tp_b
    # per chunk (the slowest stage decides); the stage holding the head runs it once per
    # micro-batch, spread over its v chunks
    v = layout.config.parallel.virtual_stages
    chunk_layers = max(len(c.layers) for s in range(layout.pp) for c in chunks_of(layout, s))
    # each chunk's forward builds its own attention mask, shared by its blocks (full recompute's
    # replay reuses it)
    f_chunk = chunk_layers * (f + tp_f) + mask_term(st) + (head_f + head_comm / 2) / v
    b_chunk = chunk_layers * (b + tp_b) + (head_b + head_comm / 2) / v
    totals = [rank_params(layout, s).total for s in range(layout.pp)]
    n_rank = max(totals)
    dp = dp_stages(st, totals, f + tp_f, b + tp_b, f_chunk, b_chunk)
    tied = tied_term(st)
    sp_moe = sp_moe_term(st)
    pipe = pp_term(st, f_chunk + dp.f_add, b_chunk + dp.b_add)
    comm = (tp_f + tp_b) * chunk_layers + head_comm / v + 2 * pipe.p2p
    after = dp.after + tied + sp_moe
    opt = optimizer_term(st, n_rank)
    step = pipe.time + after + opt
    tokens = layout.global_batch_size * st.s
    world = layout.world_size
    hw = model_flops(st.mc, layout.global_batch_size, st.s, recompute=st.recompute == "full")
    mf = model_flops(st.mc, layout.global_batch_size, st.s)
    compute = pipe.chunks * (f_chunk + b_chunk + 2 * pipe.p2p) - comm * pipe.chunks
    dp_exposed = dp.after + pipe.chunks * (dp.f_add + dp.b_add)
    exposed = {"tp": (tp_only * chunk_layers + head_comm / v) * pipe.chunks,
               "cp": (ctx.fwd + ctx.bwd) * chunk_layers * pipe.chunks,
               "pp_p2p": 2 * pipe.p2p * pipe.chunks, "dp": dp_exposed, "tied_embedding": tied}
    if st.mc.moe.num_experts:
        exposed["ep_all_to_all"] = (ep_f + ep_b) * chunk_layers * pipe.chunks
    if sp_moe:
        exposed["sp_moe_grads"] = sp_moe
    overlapped = dp.overlapped + (("ring K/V passes (behind attention)",) if ctx.hidden else ())
    return Timing(step, compute, sum(exposed.values()), pipe.bubble, opt, tokens / step,
                  hw / step / world / 1e12, mf / step / world / (cluster.peak_tflops * 1e12),
                  profile.name, exposed, dp.hidden, overlapped, ctx.hidden * chunk_layers * pipe.chunks)
