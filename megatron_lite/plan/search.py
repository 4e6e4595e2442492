"""Enumerate the candidate layouts of a model on a cluster, keep those Layout.build accepts, predict
each one's memory and step time, rank the ones that fit."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace

from ..config import Config, apply_override
from ..errors import ConfigError, UsageError
from ..layout import Layout
from ..model.counts import param_count
from ..pipeline.partition import equal_load
from .cluster import GB, OURS, Cluster, Profile
from .memory import Memory, peak_memory
from .timing import Timing, step_time


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
    profile: str = OURS.name  # the time model's implementation profile


# ZeRO variants tried by default: the native distributed optimizer (stages 1-3, which compose with
# tp, sp and pp); DeepSpeed's hold what the native ones do at best, with fewer compositions, so they
# are left to --zero.
DEFAULT_ZERO = ((0, "native"), (1, "native"), (2, "native"), (3, "native"))
ZERO_NAMES = {"0": (0, "native"), "1": (1, "native"), "2": (2, "native"), "3": (3, "native"),
              "ds1": (1, "deepspeed"), "ds2": (2, "deepspeed"), "ds3": (3, "deepspeed")}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# Context parallelism is enumerated only where each cp rank keeps at least this many tokens: below it
# the per-layer K/V exchange and the dense mask cost more than the activations it splits (tensor +
# sequence parallelism already split them within a node), and each cp size multiplies the search.
# --cp pins any size the sequence allows.
MIN_CP_TOKENS = 4096
CP_ALGORITHMS = ("allgather", "ring")


def cp_sizes(seq: int, world: int) -> list[int]:
    """The context-parallel sizes worth trying: the load-balanced layout needs seq % (2 cp) == 0."""
    return [c for c in _divisors(world) if seq % (2 * c) == 0 and seq // c >= MIN_CP_TOKENS] or [1]


def candidate_overrides(cfg: Config, cluster: Cluster, global_batch: int, micro_batch_sizes=(1, 2, 4, 8),
                        schedules=("1f1b", "interleaved"), max_virtual_stages: int = 4,
                        zero=DEFAULT_ZERO,
                        sequence_parallel: str = "auto", tp_values=None, pp_values=None, dp_values=None,
                        virtual_stages=None, cp_values=None, cp_algorithms=CP_ALGORITHMS, ep_values=None):
    """Every (tp, cp, pp, dp, sp, schedule, v, micro-batch, ZeRO, and for a MoE model ep) to try, as
    config overrides; the *_values / virtual_stages arguments pin a dimension (plan's --tp, --cp,
    --pp, --dp, --ep, --virtual-stages), cp_algorithms the context-parallel algorithms tried where
    cp > 1. Expert parallelism: every ep dividing dp x cp and the experts."""
    world = cluster.world_size
    L, par, seq = cfg.model.num_layers, cfg.parallel, cfg.seq_length
    for tp, cp in _tp_cp(cluster, world, seq, tp_values, cp_values):
        for pp in pp_values or [q for q in _divisors(world // (tp * cp)) if q <= L]:
            dp = world // (tp * cp * pp)
            if global_batch % dp or dp_values and dp not in dp_values:
                continue
            per_replica = global_batch // dp
            sps = [False] if tp == 1 else {"auto": [True, False], "on": [True],
                                             "off": [False]}[sequence_parallel]
            algorithms = [(cp, a) for a in cp_algorithms] if cp > 1 else [(1, None)]
            experts = cfg.model.moe.num_experts
            eps = [e for e in _divisors(dp * cp) if experts % e == 0] if experts else [1]
            eps = [e for e in eps if e in ep_values] if ep_values else eps
            scheds = [("1f1b", 1)] if pp == 1 else []
            if pp > 1:
                for name in schedules:
                    if name == "interleaved":
                        # only where every piece gets the same load: the slowest chunk paces them all
                        scheds += [("interleaved", v) for v in range(2, max_virtual_stages + 1)
                                   if equal_load(cfg.model, pp * v, par.partition, par.pp_layers)
                                   and (virtual_stages is None or v == virtual_stages)]
                    elif virtual_stages in (None, 1):
                        scheds.append((name, 1))
            for b in micro_batch_sizes:
                if per_replica % b:
                    continue
                for sp, (sched, v), (stage, backend), (c, algorithm), ep in itertools.product(
                        sps, scheds, zero, algorithms, eps):
                    if dp * c == 1 and stage > 0:  # ZeRO shards over dp x cp
                        continue
                    # (MoE: dropless only, a capacity's first come, first served needs the whole sequence)
                    sp_allowed = seq // c % tp == 0 and not (backend == "deepspeed" and stage > 0) \
                        and not (experts and cfg.model.moe.capacity_factor is not None)
                    if sequence_parallel == "auto" and tp > 1 and sp != sp_allowed:
                        continue  # SP wherever it is allowed (it is never worse), else without
                    ov = {"parallel.tp": tp, "parallel.cp": c, "parallel.pp": pp, "parallel.dp": dp,
                          "parallel.sequence_parallel": sp, "parallel.schedule": sched,
                          "parallel.virtual_stages": v, "parallel.microbatches": per_replica // b,
                          "data.micro_batch_size": b, "data.global_batch_size": global_batch,
                          "optim.zero.stage": stage, "optim.zero.backend": backend,
                          "train.grad_accum": 1, "parallel.ep": ep}
                    if algorithm:
                        ov["parallel.cp_algorithm"] = algorithm
                    yield ov


def _tp_cp(cluster: Cluster, world: int, seq: int, tp_values, cp_pins):
    """(tp, cp) pairs: tp within a node, cp from cp_sizes (or the pinned ones) dividing what is left."""
    for tp in tp_values or [t for t in _divisors(cluster.gpus_per_node) if world % t == 0]:
        for cp in cp_pins or cp_sizes(seq, world // tp):
            if (world // tp) % cp == 0:
                yield tp, cp


def build_config(base: Config, overrides: dict) -> Config:
    """`base` with dotted overrides (any keys), validated like a command line's."""
    raw = copy.deepcopy(base.to_dict())
    for key, value in overrides.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    return Config.from_dict(raw).validate()


def _candidate_config(base: Config, ov: dict) -> Config:
    """build_config for the keys candidate_overrides sets, without re-parsing the whole tree."""
    p = replace(base.parallel, tp=ov["parallel.tp"], pp=ov["parallel.pp"], dp=ov["parallel.dp"],
                cp=ov.get("parallel.cp", 1), ep=ov.get("parallel.ep", 1),
                cp_algorithm=ov.get("parallel.cp_algorithm", base.parallel.cp_algorithm),
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
    result = PlanResult(cluster, param_count(base.model), global_batch, s, [], [], profile=profile.name)
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
            mem = peak_memory(lay, cluster.device)
            cand = Candidate(full, lay, mem, step_time(lay, cluster, profile), mem.total <= budget)
            (result.ranked if cand.fits or not require_fit else result.too_big).append(cand)
    # equal within 0.5%: the one that needs less memory first
    result.ranked.sort(key=lambda c: (round(math.log(c.timing.step_s) / math.log(1.005)), c.memory.total))
    result.too_big.sort(key=lambda c: c.memory.total)
    return result


def _short(msg: str) -> str:
    """A rejection reason with its numbers as N, so equal reasons count together."""
    return re.sub(r"\d+", "N", msg.split(";")[0])[:160]
