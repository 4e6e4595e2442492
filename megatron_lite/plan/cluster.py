"""The hardware a plan is for: a cluster of identical GPUs, what an implementation does besides its
GEMMs (a Profile), and the time of a collective or a point-to-point message on that cluster."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

from ..errors import UsageError

GB = 1e9


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
    # dense fp32 without tensor cores (torch's default for fp32 matmuls: no TF32): what ring
    # attention's fp32 block matmuls run at (parallel/context_parallel._probs)
    fp32_tflops: float = 19.5
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
    # DGX A100 (80 GB): 312 TFLOP/s bf16 (19.5 fp32), HBM2e 2.04 TB/s, NVLink 3 (600 GB/s bidirectional),
    # 8 x 200 Gb/s HDR InfiniBand per node (Selene, the cluster of Narayanan et al.).
    "a100-80gb": Cluster("a100-80gb", 1, 8, 80.0, 312.0, 2039.0, 300.0, 8 * 200 / 8, fp32_tflops=19.5),
    # DGX H100: 989 TFLOP/s dense bf16 (67 fp32), HBM3 3.35 TB/s, NVLink 4 (900 GB/s bidirectional),
    # 8 x 400 Gb/s NDR InfiniBand per node.
    "h100": Cluster("h100", 1, 8, 80.0, 989.0, 3350.0, 450.0, 8 * 400 / 8, fp32_tflops=67.0),
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
    # the data-parallel / ZeRO collectives run behind the compute where the config asks for it
    # (parallel.overlap_grad_reduce / overlap_param_gather, native backends); False: all after the
    # backward, whatever the config says
    dp_overlap: bool = False


OURS = Profile("megatron_lite", flash_attention=True, fused_elementwise=False, scatter_gather=False,
               p2p_overlap=True, optimizer_bytes_per_param=72.0, dp_overlap=True)
# Megatron-LM as Narayanan et al. 2021 (arXiv 2104.04473) ran it, the runs of its Table 1: the paper
# describes no overlap of data-parallel communication, and the code of that time (megatron/training.py,
# train_step) all-reduced the gradients (its DistributedDataParallel's contiguous buffer) after the
# whole forward_backward_func, before the optimizer step; pipeline messages were exchanged by
# synchronous batched send/recv (p2p_overlap False); tensor-parallel all-reduces were synchronous
# like ours. So every dp term is exposed under this profile, which is also why Table 1 is compared
# under it: it measures that implementation, and GEMM_EFFICIENCY is fitted on its row 1 (dp = 32).
MEGATRON_2021 = Profile("megatron-lm 2021", flash_attention=False, fused_elementwise=True,
                        scatter_gather=True, p2p_overlap=False, optimizer_bytes_per_param=40.0,
                        dp_overlap=False)
PROFILES = {"ours": OURS, "megatron-2021": MEGATRON_2021}


def collective_time(nbytes: float, ranks: list[int], c: Cluster, kind: str = "all_reduce") -> float:
    """Ring (hierarchical across nodes) time of one collective over `ranks` (placement by rank id);
    an all-gather or reduce-scatter (`kind="gather"`) moves half an all-reduce's bytes."""
    n = len(ranks)
    if n <= 1 or nbytes <= 0:
        return 0.0
    k, nodes = _placement(tuple(ranks), c.gpus_per_node)
    factor = 2.0 if kind == "all_reduce" else 1.0
    t = factor * (k - 1) / k * nbytes / (c.intra_gbps * GB) + factor * (k - 1) * c.intra_latency_us * 1e-6
    if nodes > 1:
        t += factor * (nodes - 1) / nodes * nbytes / k / (c.nic_gbps * GB) \
            + factor * (nodes - 1) * c.inter_latency_us * 1e-6
    return t


def all_to_all_time(nbytes: float, ranks: list[int], c: Cluster) -> float:
    """One all-to-all in which every rank of `ranks` sends `nbytes` split evenly over the group (its
    own share stays): the shares for ranks on its node over NVLink, the others' over its NIC."""
    n = len(ranks)
    if n <= 1 or nbytes <= 0:
        return 0.0
    k, nodes = _placement(tuple(ranks), c.gpus_per_node)
    t = (k - 1) / n * nbytes / (c.intra_gbps * GB) + (k - 1) * c.intra_latency_us * 1e-6
    if nodes > 1:
        t += (n - k) / n * nbytes / (c.nic_gbps * GB) + (nodes - 1) * c.inter_latency_us * 1e-6
    return t


@lru_cache(maxsize=4096)
def _placement(ranks: tuple[int, ...], gpus_per_node: int) -> tuple[int, int]:
    """(most ranks of the group on one node, nodes it spans): a plan asks for the same few groups
    hundreds of thousands of times (every bucket of every candidate), each up to thousands of ranks."""
    per_node = Counter(r // gpus_per_node for r in ranks)
    return max(per_node.values()), len(per_node)


def p2p_time(nbytes: float, a: int, b: int, c: Cluster, tp: int, scatter_gather: bool) -> float:
    """One message from rank a to rank b (NVLink within a node, the NIC across nodes)."""
    if a // c.gpus_per_node == b // c.gpus_per_node:
        return nbytes / (c.intra_gbps * GB) + c.intra_latency_us * 1e-6
    if scatter_gather and tp > 1:  # each tp rank sends 1/tp over its own NIC, then an NVLink all-gather
        return nbytes / tp / (c.nic_gbps * GB) + (tp - 1) / tp * nbytes / (c.intra_gbps * GB) \
            + c.inter_latency_us * 1e-6 + (tp - 1) * c.intra_latency_us * 1e-6
    return nbytes / (c.nic_gbps * GB) + c.inter_latency_us * 1e-6
