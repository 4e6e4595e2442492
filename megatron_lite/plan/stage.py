"""What one rank of a layout holds and how its pipeline schedule runs, taken from the code itself:
parameter shapes from a meta-device GPT of the stage's pieces sliced by the TP slicing table (what
parallelize() gives that rank), in-flight micro-batches from the schedule simulator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..config import ModelConfig
from ..layout import Layout
from ..model.gpt import GPT
from ..pipeline.partition import Chunk, stage_chunks
from ..pipeline.schedules import build as build_schedule
from ..pipeline.schedules import held_messages, send_releases, simulate
from ..slicing import TPSharder, split_of

# ZeRO-2/3 with parallel.overlap_grad_reduce: at most this many fp32 staging buckets alive at once, the
# one filling included (optim/distributed.py, MAX_STAGING_BUCKETS): a new staging bucket first waits for
# the oldest reduction in flight, so one reduces while the next fills; and the end of every backward
# waits for all of them (an autograd final callback, as FSDP does), so none lives into the next forward.
# Memory: two buckets' fp32 gradients (the stage's "rest" bucket of ZeRO-3, when it stays filling
# across the blocks' backward, beside them); timing: each backward's last reduce-scatter is exposed.
MAX_STAGING_BUCKETS = 2


@dataclass(frozen=True)
class RankParams:
    """The parameters one tp rank of a stage holds, in module order (a tied weight once)."""
    sizes: tuple[int, ...]  # numel of each
    matrix: tuple[bool, ...]  # >= 2-D: AdamW's decay group (ZeroRedundancyOptimizer partitions per group)
    # MoE experts (their 1/ep share): reduced and sharded over the expert-data-parallel group
    expert: tuple[bool, ...] = ()
    block: tuple[int, ...] = ()  # the block each belongs to (-1: embedding, final norm, head)
    moe: tuple[bool, ...] = ()  # a MoE block's MLP (router, experts, shared experts): summed over tp under SP

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def experts(self) -> int:
        return sum(n for n, e in zip(self.sizes, self.expert, strict=False) if e)

    @property
    def moe_mlp(self) -> int:
        return sum(n for n, m in zip(self.sizes, self.moe, strict=False) if m)

    @property
    def matrices(self) -> int:
        return sum(n for n, m in zip(self.sizes, self.matrix, strict=True) if m)


def stage_params(mc: ModelConfig, layers, embed: bool, head: bool, tp: int = 1,
                 make_vocab_divisible_by: int = 128, ep: int = 1) -> RankParams:
    """One tp (and ep) rank's parameters of a stage holding `layers` (a count: blocks 0..n-1; or the
    global indices, which decide which blocks are MoE), the embedding, the head (cached per distinct
    shape: a plan asks for few)."""
    layers = tuple(range(layers)) if isinstance(layers, int) else tuple(layers)
    if not mc.moe.num_experts:  # every block alike: only the count matters (fewer cache entries)
        layers = tuple(range(len(layers)))
    return _stage_params(tuple(vars(mc).items()), layers, embed, head, tp, make_vocab_divisible_by, ep)


@lru_cache(maxsize=1024)
def _stage_params(model_items: tuple, layers: tuple[int, ...], embed: bool, head: bool, tp: int,
                  divisible_by: int, ep: int) -> RankParams:
    mc = ModelConfig(**dict(model_items))
    with torch.device("meta"):
        model = GPT(mc, seed=None, layers=layers, embed=embed, head=head)
    # at tp = 1 the table slices nothing and pads nothing, like the serial model the trainer keeps
    shard = TPSharder(mc, tp, 0, divisible_by, ep, 0)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # (not expert_bias)
    shapes = [shard(name, p).shape for name, p in named]
    expert = tuple(ep > 1 and split is not None and split.axis == "ep"
                   for split in (split_of(name, mc) for name, _ in named))
    block = tuple(int(name.split(".")[1]) if name.startswith("blocks.") else -1 for name, _ in named)
    moe = tuple(i >= 0 and mc.moe.is_moe(i) and ".mlp." in name
                for i, (name, _) in zip(block, named, strict=True))
    return RankParams(tuple(math.prod(s) for s in shapes), tuple(len(s) >= 2 for s in shapes), expert, block,
                      moe)


def chunks_of(layout: Layout, stage: int) -> tuple[Chunk, ...]:
    """layout.chunks(stage), cached per partition shape: a plan asks for the same few thousands of
    times (every term of every stage of every candidate) and each call re-partitions the model."""
    p = layout.config.parallel
    return _chunks(tuple(vars(layout.config.model).items()), p.pp, stage, p.virtual_stages, p.partition,
                   tuple(p.pp_layers) if p.pp_layers else None)


@lru_cache(maxsize=4096)
def _chunks(model_items: tuple, pp: int, stage: int, v: int, partition: str, sizes) -> tuple[Chunk, ...]:
    return tuple(stage_chunks(ModelConfig(**dict(model_items)), pp, stage, v, partition,
                              list(sizes) if sizes else None))


def rank_params(layout: Layout, stage: int) -> RankParams:
    """What a rank at pipeline stage `stage` of `layout` holds (all its virtual-stage chunks)."""
    chunks = chunks_of(layout, stage)
    layers = [i for c in chunks for i in c.layers]
    embed, head = any(c.first for c in chunks), any(c.last for c in chunks)
    return stage_params(layout.config.model, layers, embed, head, layout.tp,
                        layout.config.parallel.make_vocab_divisible_by, layout.ep)


def block_linear_params(mc: ModelConfig, tp: int) -> int:
    """Weights of one block's linear layers on one tp rank: what autocast keeps bf16 copies of
    (biases are cast too, but the backward does not keep them)."""
    return stage_params(mc, 1, False, False, tp).matrices


# ---- the schedule, simulated once per shape ------------------------------------------------------
@dataclass(frozen=True)
class ScheduleFacts:
    finish: float  # step time in units of one chunk's forward
    bubble: float  # idle fraction of the busiest stage
    peak: tuple[int, ...]  # per stage: chunk-micro-batches in flight at most (the simulator's count)
    peak_after_backward: tuple[int, ...]  # the same, counted only once a backward has run (grads exist)
    held: tuple[int, ...]  # per stage: the most message buffers the engine holds at once


@lru_cache(maxsize=64)
def _schedule(name: str, pp: int, m: int, v: int):
    return build_schedule(name, pp, m, v)


@lru_cache(maxsize=1024)
def schedule_time(name: str, pp: int, m: int, v: int, b_over_f: float) -> tuple[float, float]:
    """(finish, bubble) of the simulated schedule: what the step-time model needs, without the
    message bookkeeping schedule_facts adds for memory (the bulk of its cost, at a few ratios per shape)."""
    finish, busy, _ = simulate(_schedule(name, pp, m, v), 1.0, b_over_f)
    return finish, 1.0 - max(busy) / finish


@lru_cache(maxsize=256)
def schedule_facts(name: str, pp: int, m: int, v: int, b_over_f: float) -> ScheduleFacts:
    lists = _schedule(name, pp, m, v)
    finish, busy, peak = simulate(lists, 1.0, b_over_f)
    releases = send_releases(lists)  # every stage's at once: computed once, not per stage
    held = tuple(held_messages(lists, s, releases=releases) for s in range(pp))
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
    return ScheduleFacts(finish, 1.0 - max(busy) / finish, tuple(peak), tuple(after), held)
