"""Which layouts verify compares: every valid combination of axis variants at a world size, the
default selection that covers each variant, and the tiny model and run each of them trains.

A layout's name joins its axes with ".", each present only when > 1: tp2 (+sp), cp2:<algorithm>,
pp2:<schedule>, dp2 (:zero1-3, :ds-zero1-3) and, for a mixture-of-experts model only, ep2 (the
experts split over groups of 2 of the ranks whose gradients are reduced together: the dp ranks, or
dp x cp where the layout rules allow), e.g. tp2.dp2:zero1.ep2."""

from __future__ import annotations

import fnmatch
import importlib.util
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import LayoutError, UsageError
from ..layout import Layout

# The tiny model and run: small enough for 2 CPU cores, shaped so every layout rule has a case (the
# heads, width and sequence follow the world size: tiny_model).
BASE = [
    "model.vocab_size=125",  # not a multiple of tp x 8: the padded vocabulary rows take part
    "model.num_layers=8",  # pp x 2 virtual stages up to pp=4
    "model.dropout=0.0", "parallel.make_vocab_divisible_by=8",
    # AdamW divides by sqrt(v) + eps: eps=1e-4 (not 1e-8) keeps gradient entries that are rounding
    # noise around zero from turning into whole-lr steps that differ per layout (see TOLERANCES).
    # Clipping at 0.3 engages (the serial gradient norms of the first steps are ~1.3, 0.7, 0.45).
    "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=0", "optim.eps=1e-4", "optim.grad_clip=0.3",
    "train.progress=false", "train.sample_tokens=0", "train.precision=fp32", "train.recompute=none",
    "launch.collective_timeout_s=180",
]
SCHEDULES = ("gpipe", "1f1b", "interleaved")
CP_ALGORITHMS = ("allgather", "ring")
# --document-mask: packed documents of the token store, attention kept inside each (every run)
DOCUMENTS = ["data.document_mask=true", "data.reset_position_ids=true", "data.mask_separator_loss=true"]
# --moe: every other block a mixture of 4 SwiGLU experts (top 2) and a shared one, both router losses
# on (their gradient through the router), so dense and MoE blocks, and every expert-parallel size the
# layout rules accept (dividing the data-parallel ranks and the 4 experts), take part (the overrides
# given after --moe still apply on top)
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.intermediate_size=32",
       "model.moe.num_shared_experts=1", "model.moe.layer_freq=2", "model.moe.aux_loss_coeff=0.01",
       "model.moe.z_loss_coeff=0.001", "model.activation=swiglu"]
# The Switch balancing loss of a micro-batch is not the mean of its halves' (E sum_e f_e P_e is a
# product of two means over the micro-batch's tokens), so under MoE the serial run and every layout
# take micro-batches of this many samples: the same sets of samples (contiguous, the dp ranks' taken
# in turn), the same objective. Dense models keep 2 micro-batches per stage (fewer, faster runs).
MOE_MICRO_BATCH = 2
ZERO = ("plain", "zero1", "zero2", "zero3", "ds-zero1", "ds-zero2", "ds-zero3")
PRECISIONS = ("fp32", "bf16")
@dataclass(frozen=True)
class Variant:
    """One layout to verify."""
    tp: int
    pp: int
    dp: int
    sp: bool = False
    schedule: str | None = None  # pp > 1
    zero: str | None = None  # dp > 1: one of ZERO
    cp: int = 1
    cp_algorithm: str | None = None  # cp > 1: one of CP_ALGORITHMS
    ep: int = 1  # MoE models only: experts split over groups of ep of the dp (x cp) ranks

    @property
    def name(self) -> str:
        parts = []
        if self.tp > 1:
            parts.append(f"tp{self.tp}{'+sp' if self.sp else ''}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}:{self.cp_algorithm}")
        if self.pp > 1:
            parts.append(f"pp{self.pp}:{self.schedule}")
        if self.dp > 1:
            parts.append(f"dp{self.dp}" + ("" if self.zero == "plain" else f":{self.zero}"))
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        return ".".join(parts) or "serial"

    def features(self) -> set[tuple[str, object]]:
        """The axis variants this layout uses (what the default selection covers)."""
        out: set[tuple[str, object]] = set()
        if self.tp > 1:
            out.add(("sp", self.sp))
        if self.cp > 1:
            out.add(("cp_algorithm", self.cp_algorithm))
        if self.pp > 1:
            out.add(("schedule", self.schedule))
        if self.dp > 1:
            out.add(("zero", self.zero))
        if self.dp * self.cp > 1:  # ep1 too: an MoE model's shapes keep a layout with whole experts
            out.add(("ep", self.ep))
        return out

    def micro_batches(self, global_batch: int, micro_batch: int | None = None) -> int:
        """Per step and dp rank: 2 per stage under pipelining (interleaving needs a multiple of pp);
        with micro_batch (MoE: MOE_MICRO_BATCH) as many as global_batch takes at that size: with
        global_batch() = 4 x world and 2, that is 2 x tp x cp x pp (a multiple of pp, >= 2 per stage)."""
        if micro_batch is not None:
            return global_batch // (self.dp * micro_batch)
        return 2 * self.pp if self.pp > 1 else 2

    def overrides(self, global_batch: int, micro_batch: int | None = None) -> list[str]:
        m = self.micro_batches(global_batch, micro_batch)
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.dp={self.dp}",
               f"parallel.sequence_parallel={str(self.sp).lower()}", f"parallel.microbatches={m}",
               f"data.micro_batch_size={global_batch // (self.dp * m)}",
               # every rank evaluates the same global_batch validation samples, as the serial run does
               f"train.eval_iters={self.dp * m}", f"parallel.cp={self.cp}", f"parallel.ep={self.ep}"]
        if self.cp > 1:
            out.append(f"parallel.cp_algorithm={self.cp_algorithm}")
        if self.pp > 1:
            v = 2 if self.schedule == "interleaved" else 1
            out += [f"parallel.schedule={self.schedule}", f"parallel.virtual_stages={v}"]
        if self.zero not in (None, "plain"):
            stage = self.zero[-1]
            backend = "deepspeed" if self.zero.startswith("ds-") else "native"
            out += [f"optim.zero.stage={stage}", f"optim.zero.backend={backend}"]
        return out


def _factorizations(world: int) -> list[tuple[int, int, int, int]]:
    """Every (tp, cp, pp, dp) whose product is the world size."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    return [(tp, cp, pp, world // (tp * cp * pp)) for tp in divisors for cp in divisors for pp in divisors
            if world % (tp * cp * pp) == 0]


def global_batch(world: int) -> int:
    """Samples per step, the same for every layout (and the serial run): divisible by dp x m of each."""
    return 4 * world


def moe_micro_batch(world: int, model_overrides: list[str]) -> int | None:
    """MOE_MICRO_BATCH when the model verify trains is a mixture of experts, else None."""
    probe = make_config(None, world, 1, "unused", "unused", model_overrides)
    return MOE_MICRO_BATCH if probe.model.moe.num_experts else None


def candidates(world: int, model_overrides: list[str], deepspeed: bool = True, precision: str = "fp32"
               ) -> tuple[list[Variant], dict[str, str]]:
    """Every combination of axis variants that is a valid Layout at this world size (e.g. DeepSpeed
    ZeRO without sequence parallelism, interleaving only with enough blocks; for an MoE model every
    ep the rules accept, and nothing they refuse it, e.g. DeepSpeed), and for
    each tp x cp x pp x dp that has none, why (the Layout's sentence)."""
    out, unfit = [], {}
    micro_batch = moe_micro_batch(world, model_overrides)
    for tp, cp, pp, dp in _factorizations(world):
        if (tp, cp, pp, dp) == (1, 1, 1, 1):
            continue
        valid, reason = 0, ""
        # ep > 1 only for an MoE model (a dense one has no experts to split): each divisor of the
        # ranks that hold the same weights, the Layout dropping those it refuses (not dividing the
        # experts, or dp where ep is carved from dp alone). Last: a combination's first refusal is ep1's.
        eps = [e for e in range(1, dp * cp + 1) if dp * cp % e == 0] if micro_batch is not None else [1]
        for sp, algorithm, schedule, zero, ep in itertools.product(
                (False, True) if tp > 1 else (False,), CP_ALGORITHMS if cp > 1 else (None,),
                SCHEDULES if pp > 1 else (None,), ZERO if dp > 1 else (None,), eps):
            if zero is not None and zero.startswith("ds-") and not deepspeed:
                continue
            v = Variant(tp, pp, dp, sp, schedule, zero, cp, algorithm, ep)
            try:
                Layout.build(make_config(v, world, 1, "unused", "unused", model_overrides,
                                         precision=precision, micro_batch=micro_batch), world)
            except LayoutError as e:
                reason = reason or str(e)
                continue
            out.append(v)
            valid += 1
        if not valid:
            shape = (("tp", tp), ("cp", cp), ("pp", pp), ("dp", dp))
            unfit[".".join(f"{a}{n}" for a, n in shape if n > 1)] = reason
    return out, unfit


def default_selection(cands: list[Variant]) -> list[Variant]:
    """Per factorization, a few layouts that together use each variant of each axis at least once
    (greedy cover, in candidate order): all of them for a single parallel axis, fewer combinations."""
    chosen = []
    by_shape: dict[tuple[int, int, int, int], list[Variant]] = {}
    for v in cands:
        by_shape.setdefault((v.tp, v.cp, v.pp, v.dp), []).append(v)
    for group in by_shape.values():
        todo = set().union(*(v.features() for v in group))
        while todo:
            best = max(group, key=lambda v: len(v.features() & todo))  # first of the best: stable
            chosen.append(best)
            todo -= best.features()
    return [v for v in cands if v in chosen]


def select(cands: list[Variant], patterns: list[str] | None) -> list[Variant]:
    """The default selection, or every candidate whose name contains one of the glob patterns."""
    if not patterns:
        return default_selection(cands)
    return [v for v in cands if any(fnmatch.fnmatchcase(v.name, f"*{p}*") for p in patterns)]


def tiny_model(world: int) -> list[str]:
    """Heads (and kv heads) divisible by every tensor-parallel size up to 8 that divides the world
    size, 8 dims per head, and a sequence that sequence parallelism can split as evenly: 4 heads,
    hidden 32 and 16 tokens at 2 or 4 processes; 8 heads and hidden 64 at 8."""
    heads = math.lcm(4, *(d for d in range(1, 9) if world % d == 0))
    return [f"model.num_attention_heads={heads}", f"model.hidden_size={8 * heads}",
            f"model.max_sequence_length={math.lcm(16, heads)}"]


def make_config(v: Variant | None, world: int, steps: int, data_dir: str, out_dir: str,
                model_overrides: list[str], device: str = "cpu", precision: str = "fp32",
                documents: bool = False, micro_batch: int | None = None) -> Config:
    """The run of layout v (None: the serial reference: 2 micro-batches of half the global batch, or
    of micro_batch samples each when given: MoE, MOE_MICRO_BATCH)."""
    g = global_batch(world)
    b = micro_batch or g // 2
    layout = v.overrides(g, micro_batch) if v is not None else \
        [f"data.micro_batch_size={b}", f"train.grad_accum={g // b}", f"train.eval_iters={g // b}"]
    layout += DOCUMENTS if documents else []
    return Config.from_yaml(None, BASE + tiny_model(world) + list(model_overrides) + layout + [
        f"train.steps={steps}", f"data.dir={data_dir}", f"train.out_dir={out_dir}", f"train.device={device}",
        f"train.precision={precision}"])


@dataclass(frozen=True)
class Selection:
    """One verify run's checked arguments and the layouts it compares with the serial model."""
    world: int
    steps: int
    model_overrides: list[str]
    device: str  # as asked: auto, cpu or cuda
    probe: Config  # the serial run's config: the model facts for the header and the JSON
    layouts: list[Variant]
    unfit: dict[str, str]  # tp x cp x pp x dp -> why no layout of it fits this model
    deepspeed: bool  # installed (else its ZeRO layouts are left out)
    precision: str = "fp32"  # of every run, the serial one included
    documents: bool = False  # packed documents with attention kept inside each (DOCUMENTS)
    micro_batch: int | None = None  # MoE: every run's micro-batch size (MOE_MICRO_BATCH)

    def config(self, v: Variant | None, data_dir: Path, out_dir: Path) -> Config:
        return make_config(v, self.world, self.steps, str(data_dir), str(out_dir), self.model_overrides,
                           self.device, self.precision, self.documents, self.micro_batch)


def select_layouts(world: int, steps: int = 3, patterns: list[str] | None = None,
                   model_overrides: list[str] = (), device: str = "auto",
                   precision: str = "fp32", documents: bool = False, moe: bool = False) -> Selection:
    """Check the arguments (each mistake one sentence, before any process group) and choose the
    layouts. moe: the tiny model with MOE's experts (model_overrides still apply on top of them)."""
    if world < 2:
        raise UsageError("verify compares parallel layouts with the serial model and needs >= 2 processes; "
                         "start it with `torchrun --nproc-per-node N -m megatron_lite.cli verify` or one "
                         "srun task per rank.")
    if steps < 1:
        raise UsageError(f"--steps={steps} must be >= 1.")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision={precision!r} must be one of {', '.join(PRECISIONS)}.")
    model_overrides = list(model_overrides)
    for o in model_overrides:
        if not o.startswith(("model.", "parallel.order=")):
            raise UsageError(f"verify takes model.* (and parallel.order) overrides only, not {o!r}; it picks "
                             f"the layouts, batch and optimizer itself.")
    model_overrides = (MOE if moe else []) + model_overrides  # kept in the JSON's model_overrides
    micro_batch = moe_micro_batch(world, model_overrides)
    probe = make_config(None, world, steps, "unused", "unused", model_overrides, device,
                        micro_batch=micro_batch)
    if probe.model.dropout != 0:
        raise UsageError(f"model.dropout={probe.model.dropout}: verify needs model.dropout=0 (dropout masks "
                         f"depend on the layout, so no layout could match the serial run).")
    have_ds = importlib.util.find_spec("deepspeed") is not None
    cands, unfit = candidates(world, model_overrides, have_ds, precision)
    chosen = select(cands, patterns)
    if not chosen:
        raise UsageError(f"no valid layout at world size {world} matches --layouts "
                         f"{' '.join(patterns or [])}; choose from: "
                         f"{', '.join(v.name for v in cands) or 'none (see the model overrides)'}.")
    return Selection(world, steps, model_overrides, device, probe, chosen, unfit, have_ds, precision,
                     documents, micro_batch)


