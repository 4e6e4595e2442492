"""Which layouts verify compares: every valid combination of axis variants at a world size, the
default selection that covers each variant, and the tiny model and run each of them trains."""

from __future__ import annotations

import fnmatch
import importlib.util
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

    @property
    def name(self) -> str:
        parts = []
        if self.tp > 1:
            parts.append(f"tp{self.tp}{'+sp' if self.sp else ''}")
        if self.pp > 1:
            parts.append(f"pp{self.pp}:{self.schedule}")
        if self.dp > 1:
            parts.append(f"dp{self.dp}" + ("" if self.zero == "plain" else f":{self.zero}"))
        return ".".join(parts) or "serial"

    def features(self) -> set[tuple[str, object]]:
        """The axis variants this layout uses (what the default selection covers)."""
        out: set[tuple[str, object]] = set()
        if self.tp > 1:
            out.add(("sp", self.sp))
        if self.pp > 1:
            out.add(("schedule", self.schedule))
        if self.dp > 1:
            out.add(("zero", self.zero))
        return out

    def micro_batches(self) -> int:
        """Per step and dp rank: 2 per stage under pipelining (interleaving needs a multiple of pp)."""
        return 2 * self.pp if self.pp > 1 else 2

    def overrides(self, global_batch: int) -> list[str]:
        m = self.micro_batches()
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.dp={self.dp}",
               f"parallel.sequence_parallel={str(self.sp).lower()}", f"parallel.microbatches={m}",
               f"data.micro_batch_size={global_batch // (self.dp * m)}",
               # every rank evaluates the same global_batch validation samples, as the serial run does
               f"train.eval_iters={self.dp * m}"]
        if self.pp > 1:
            v = 2 if self.schedule == "interleaved" else 1
            out += [f"parallel.schedule={self.schedule}", f"parallel.virtual_stages={v}"]
        if self.zero not in (None, "plain"):
            stage = self.zero[-1]
            backend = "deepspeed" if self.zero.startswith("ds-") else "native"
            out += [f"optim.zero.stage={stage}", f"optim.zero.backend={backend}"]
        return out


def _factorizations(world: int) -> list[tuple[int, int, int]]:
    return [(tp, pp, world // (tp * pp)) for tp in range(1, world + 1) if world % tp == 0
            for pp in range(1, world // tp + 1) if (world // tp) % pp == 0]


def global_batch(world: int) -> int:
    """Samples per step, the same for every layout (and the serial run): divisible by dp x m of each."""
    return 4 * world


def candidates(world: int, model_overrides: list[str], deepspeed: bool = True, precision: str = "fp32"
               ) -> tuple[list[Variant], dict[str, str]]:
    """Every combination of axis variants that is a valid Layout at this world size (e.g. DeepSpeed
    ZeRO without sequence parallelism, interleaving only with enough blocks), and for each
    tp x pp x dp that has none, why (the Layout's sentence)."""
    out, unfit = [], {}
    for tp, pp, dp in _factorizations(world):
        if (tp, pp, dp) == (1, 1, 1):
            continue
        valid, reason = 0, ""
        for sp in ((False, True) if tp > 1 else (False,)):
            for schedule in (SCHEDULES if pp > 1 else (None,)):
                for zero in (ZERO if dp > 1 else (None,)):
                    if zero is not None and zero.startswith("ds-") and not deepspeed:
                        continue
                    v = Variant(tp, pp, dp, sp, schedule, zero)
                    try:
                        Layout.build(make_config(v, world, 1, "unused", "unused", model_overrides,
                                                 precision=precision), world)
                    except LayoutError as e:
                        reason = reason or str(e)
                        continue
                    out.append(v)
                    valid += 1
        if not valid:
            unfit[".".join(f"{a}{n}" for a, n in (("tp", tp), ("pp", pp), ("dp", dp)) if n > 1)] = reason
    return out, unfit


def default_selection(cands: list[Variant]) -> list[Variant]:
    """Per factorization, a few layouts that together use each variant of each axis at least once
    (greedy cover, in candidate order): all of them for a single parallel axis, fewer combinations."""
    chosen = []
    by_shape: dict[tuple[int, int, int], list[Variant]] = {}
    for v in cands:
        by_shape.setdefault((v.tp, v.pp, v.dp), []).append(v)
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
                model_overrides: list[str], device: str = "cpu", precision: str = "fp32") -> Config:
    """The run of layout v (None: the serial reference: 2 micro-batches of half the global batch)."""
    g = global_batch(world)
    layout = v.overrides(g) if v is not None else \
        ["data.micro_batch_size=" + str(g // 2), "train.grad_accum=2", "train.eval_iters=2"]
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
    unfit: dict[str, str]  # tp x pp x dp -> why no layout of it fits this model
    deepspeed: bool  # installed (else its ZeRO layouts are left out)
    precision: str = "fp32"  # of every run, the serial one included

    def config(self, v: Variant | None, data_dir: Path, out_dir: Path) -> Config:
        return make_config(v, self.world, self.steps, str(data_dir), str(out_dir), self.model_overrides,
                           self.device, self.precision)


def select_layouts(world: int, steps: int = 3, patterns: list[str] | None = None,
                   model_overrides: list[str] = (), device: str = "auto",
                   precision: str = "fp32") -> Selection:
    """Check the arguments (each mistake one sentence, before any process group) and choose the layouts."""
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
    probe = make_config(None, world, steps, "unused", "unused", model_overrides, device)
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
    return Selection(world, steps, model_overrides, device, probe, chosen, unfit, have_ds, precision)


