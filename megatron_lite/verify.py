"""`megatron-lite verify`: every parallel layout that fits this job, trained against the serial model.

    torchrun --standalone --nproc-per-node 4 -m megatron_lite.cli verify [--layouts PAT ...] [--steps 3]
    srun --ntasks 4 megatron-lite verify --json verify.json        # SLURM: one task per rank

For each layout tp x pp x dp = world size (tensor parallelism with and without sequence parallelism;
each pipeline schedule, interleaved with 2 virtual stages where the blocks allow; data parallelism
plain, with native ZeRO-1 and with DeepSpeed ZeRO 1-3; and their combinations) a tiny GPT built here
trains a few AdamW steps through the real Trainer and backend, from the same seed and on the same
global batches (random tokens written to a per-rank temporary token store) as the serial model,
which every rank also trains by itself. Compared, for every layout:
    loss    every step's training loss and one evaluation (forward-only) loss at the end
    norm    every step's global gradient norm (what clipping uses; clipping engages)
    grad    step 1's finished gradients (data-parallel mean, sequence-parallel sums, tied-embedding
            sum; before clipping), each rank's slices against the same slices of the serial
            gradient (TPSharder: the slicing table that parallelizes the model and checkpoints it)
    param   every weight after the last step (DeepSpeed: its fp32 masters, through the accessors
            the checkpoint uses)
Every serial parameter must be compared by some rank. Rank 0 prints one row per layout and exits 1
if any layout is outside the tolerances (TOLERANCES, below).

The layouts run one after another inside one job: each builds its own process groups (every rank
calls Topology.build in the same order). By default each tp x pp x dp factorization of the world
size runs a few variants that together use every variant of each of its axes (sequence parallelism,
schedule, ZeRO backend and stage) at least once; --layouts picks from all valid combinations.
"""

from __future__ import annotations

import fnmatch
import gc
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..distributed import comm
from ..distributed.env import RunEnv
from ..errors import LayoutError, UsageError
from ..layout import Layout
from ..optim import lr_at
from ..parallel.grads import GradSync
from .backends import DeepSpeedBackend
from .trainer import Trainer, resolve_device

# fp32 tolerances. A parallel layout computes the same sums in another order (matmuls split over tp
# and reduced, micro-batches accumulated per dp rank and then averaged, vocab-parallel instead of
# fused cross-entropy, DeepSpeed's flat buckets); each fp32 rounding is <= 6e-8 relative. On the
# real code (CPU, 2 and 4 ranks) the differences stay below 2e-7 relative on losses and gradient
# norms, 1e-6 of a tensor's largest entry on gradients, and ~1.2e-7 absolute on weights (one ulp of
# the LayerNorm weights near 1). Weights are compared in units of how far AdamW can move them in
# these steps (about lr per step, whatever the gradient's scale): AdamW divides by sqrt(v) + eps,
# so an entry whose gradient is rounding noise around zero (e.g. the key bias, whose exact gradient
# is 0: softmax ignores a shift shared by every key) moves by a noise-driven amount that differs
# per layout; with eps=1e-4 (BASE) that stays at the ulp level, with torch's 1e-8 it reached
# ~3e-3 of lr x steps. Every tolerance sits >= 50x above what the real code shows; the bugs verify
# exists for (a missing all-reduce, a dropped micro-batch, a mis-sliced shard) move these
# quantities by 1e-3 to 1 relative, and weights by ~lr.
TOLERANCES = {
    "loss": 1e-5,  # x |serial loss|, for every step's loss and the evaluation loss
    "norm": 1e-5,  # x the serial global gradient norm, every step
    "grad": 1e-4,  # x max |serial gradient| of the same tensor (step 1)
    "param": 1e-3,  # x the sum of the learning rates of the steps (AdamW's largest move), after the last
}

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
ZERO = ("plain", "zero1", "ds-zero1", "ds-zero2", "ds-zero3")
DATA_SEED = 20240917


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


def candidates(world: int, model_overrides: list[str], deepspeed: bool = True
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
                        Layout.build(make_config(v, world, 1, "unused", "unused", model_overrides), world)
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
                model_overrides: list[str], device: str = "cpu") -> Config:
    """The run of layout v (None: the serial reference: 2 micro-batches of half the global batch)."""
    g = global_batch(world)
    layout = v.overrides(g) if v is not None else \
        ["data.micro_batch_size=" + str(g // 2), "train.grad_accum=2", "train.eval_iters=2"]
    return Config.from_yaml(None, BASE + tiny_model(world) + list(model_overrides) + layout + [
        f"train.steps={steps}", f"data.dir={data_dir}", f"train.out_dir={out_dir}", f"train.device={device}"])


def write_token_store(directory: Path, vocab_size: int, seq_len: int, train_windows: int,
                      val_windows: int) -> None:
    """A token store (meta.json + train/val .bin) of random ids from a fixed seed: the same bytes on
    every rank, so no rank depends on another's filesystem."""
    rng = np.random.default_rng(DATA_SEED)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, windows in (("train", train_windows), ("val", val_windows)):
        ids = rng.integers(0, vocab_size, size=windows * seq_len + 1, dtype=np.int64).astype(np.uint16)
        ids.tofile(directory / f"{split}.bin")
        np.save(directory / f"{split}.idx.npy", np.zeros(1, dtype=np.int64))
        splits[split] = {"tokens": int(ids.size), "documents": 1}
    meta = {"vocab_size": vocab_size, "eot_id": vocab_size - 1, "dtype": "uint16", "splits": splits,
            "tokenizer": {"type": "verify-random"}}
    (directory / "meta.json").write_text(json.dumps(meta))


# ---- one run ----------------------------------------------------------------------------------
@dataclass
class Run:
    """What one run (a layout's, or the serial reference) produced on this rank."""
    trainer: Trainer
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # step 1, local names
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # after the last step


@dataclass(frozen=True)
class _GradTap(GradSync):
    """The backend's GradSync, which hands the finished gradients to `tap` just before clipping."""
    tap: object = None

    def clip(self, model, max_norm: float) -> float:
        self.tap()
        return super().clip(model, max_norm)


def _local_grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().clone()
            for n, p in model.named_parameters()}


def _install_tap(trainer: Trainer, grads: dict) -> None:
    """Capture step 1's finished, unclipped gradients: from our GradSync between finishing and
    clipping, or from DeepSpeed's partitions before its step (which reduces, then clips)."""
    backend = trainer.backend

    def grab():
        if not grads:
            grads.update(_deepspeed_grads(trainer.model) if isinstance(backend, DeepSpeedBackend)
                         else _local_grads(trainer.model))
    if isinstance(backend, DeepSpeedBackend):
        real_step = backend.step

        def step(lr, loss):
            grab()
            return real_step(lr, loss)
        backend.step = step
    else:
        sync = backend.grad_sync
        backend.grad_sync = _GradTap(**{f.name: getattr(sync, f.name) for f in fields(GradSync)}, tap=grab)


def _deepspeed_grads(model) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad  # collective over the data-parallel group
    out = {}
    for n, p in model.named_parameters():
        g = safe_get_full_grad(p)
        out[n] = (g if g is not None else torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                  ).detach().float().cpu().clone()
    return out


def train_run(cfg: Config, env: RunEnv, steps: int) -> Run:
    trainer = Trainer(cfg, env)
    run = Run(trainer)
    _install_tap(trainer, run.grads)
    for _ in range(steps):
        r = trainer.train_step()
        run.losses.append(r.loss)
        run.norms.append(r.grad_norm)
    run.val_loss = trainer.evaluate()
    pieces = trainer.backend.stateful()  # DeepSpeed's fp32 masters, through the checkpoint's accessors
    for n, p in trainer.model.named_parameters():
        value = pieces.get_param(p) if pieces.get_param is not None else p
        run.params[n] = value.detach().float().cpu().clone()
    run.grads = {n: g.cpu() for n, g in run.grads.items()}
    return run


# ---- comparison -------------------------------------------------------------------------------
@dataclass
class Diff:
    """Largest absolute difference, and the worst difference / tolerance ratio (> 1 fails)."""
    abs: float = 0.0
    ratio: float = 0.0
    where: str = ""

    def add(self, diff: float, scale: float, rtol: float, where: str) -> None:
        ratio = diff / (rtol * scale) if scale > 0 else (math.inf if diff > 0 else 0.0)
        if not math.isfinite(diff):
            ratio = math.inf
        self.abs = max(self.abs, diff) if math.isfinite(diff) else math.inf
        if ratio > self.ratio or not self.where:
            self.ratio, self.where = ratio, where

    def merge(self, other: "Diff") -> None:
        self.abs = max(self.abs, other.abs)
        if other.ratio > self.ratio or not self.where:
            self.ratio, self.where = other.ratio, other.where


def adam_movement(cfg: Config, steps: int) -> float:
    """How far AdamW can move a weight in `steps` steps: about the sum of their learning rates."""
    return sum(lr_at(s, cfg.optim, cfg.train.steps) for s in range(steps))


def compare(run: Run, ref: Run, rank: int) -> dict:
    """This rank's differences from the serial run: its scalars, and its slices of each tensor
    against the same slices of the serial tensor."""
    out = {k: Diff() for k in TOLERANCES}
    movement = adam_movement(ref.trainer.cfg, len(ref.losses))
    for i, (got, want) in enumerate(zip(run.losses, ref.losses, strict=True)):
        out["loss"].add(abs(got - want), abs(want), TOLERANCES["loss"], f"step {i + 1} loss")
    out["loss"].add(abs(run.val_loss - ref.val_loss), abs(ref.val_loss), TOLERANCES["loss"],
                    "evaluation loss")
    for i, (got, want) in enumerate(zip(run.norms, ref.norms, strict=True)):
        out["norm"].add(abs(got - want), abs(want), TOLERANCES["norm"], f"step {i + 1} grad norm")
    tp = run.trainer.tp
    compared: dict[str, set[str]] = {"grad": set(), "param": set()}
    for kind, mine, serial in (("grad", run.grads, ref.grads), ("param", run.params, ref.params)):
        for name, t in mine.items():
            # a pipeline's last stage holds its own copy of a tied embedding; the serial model one
            full = serial[name if name in serial else "tok_emb.weight"]
            want = tp.sharder(name, full) if tp is not None else full
            where = f"{kind} {name} (rank {rank})"
            if want.shape != t.shape:
                out[kind].add(math.inf, 1.0, 1.0, f"{where}: shape {tuple(t.shape)} not {tuple(want.shape)}")
                continue
            diff = (t - want).abs().max().item() if t.numel() else 0.0
            scale = full.abs().max().item() if kind == "grad" else movement
            out[kind].add(diff, scale, TOLERANCES[kind], where)
            compared[kind].add(name)
    return {"diffs": out, "compared": compared}


# ---- the command ------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    loss: Diff
    norm: Diff
    grad: Diff
    param: Diff
    seconds: float
    error: str = ""
    losses: list[float] = field(default_factory=list)  # rank 0's training loss per step (for plots)

    @property
    def passed(self) -> bool:
        return not self.error and all(d.ratio <= 1.0 for d in (self.loss, self.norm, self.grad, self.param))

    def as_dict(self) -> dict:
        out = {"layout": self.name, "passed": self.passed, "seconds": round(self.seconds, 3)}
        for k in TOLERANCES:
            d = getattr(self, k)
            out[k] = {"max_abs_diff": d.abs, "worst_ratio_to_tolerance": d.ratio, "worst": d.where}
        out["losses"] = self.losses
        if self.error:
            out["error"] = self.error
        return out


COLUMNS = (("loss", "max|Δloss|"), ("norm", "max|Δnorm|"), ("grad", "max|Δgrad|"), ("param", "max|Δparam|"))


def format_header(width: int) -> str:
    return f"{'layout':<{width}} " + " ".join(f"{title:>11}" for _, title in COLUMNS) + \
        f" {'worst/tol':>9} {'time':>6}  result"


def format_row(r: Row, width: int) -> str:
    diffs = [getattr(r, k) for k, _ in COLUMNS]
    worst = max(diffs, key=lambda d: d.ratio)
    text = f"{r.name:<{width}} " + " ".join(f"{d.abs:>11.2e}" for d in diffs) + \
        f" {worst.ratio:>9.2g} {r.seconds:>5.1f}s  "
    if r.error:
        return text + f"ERROR {r.error}"
    if r.passed:
        return text + "PASS"
    bad = [k for (k, _), d in zip(COLUMNS, diffs, strict=True) if d.ratio > 1.0]
    return text + f"FAIL {' '.join(bad)} (worst: {worst.where})"


def _say(*parts) -> None:
    print(*parts, flush=True)  # under a launcher stdout is a pipe: each row as soon as it is known


def verify(env: RunEnv, steps: int = 3, patterns: list[str] | None = None, model_overrides: list[str] = (),
           json_path: str | None = None, device: str = "auto") -> int:
    """Verify every selected layout on this job; returns the exit status (0: all passed, 1: not)."""
    started = time.perf_counter()
    world = env.world_size
    if world < 2:
        raise UsageError("verify compares parallel layouts with the serial model and needs >= 2 processes; "
                         "start it with `torchrun --nproc-per-node N -m megatron_lite.cli verify` or one "
                         "srun task per rank.")
    if steps < 1:
        raise UsageError(f"--steps={steps} must be >= 1.")
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
    cands, unfit = candidates(world, model_overrides, have_ds)
    chosen = select(cands, patterns)
    if not chosen:
        raise UsageError(f"no valid layout at world size {world} matches --layouts "
                         f"{' '.join(patterns or [])}; choose from: "
                         f"{', '.join(v.name for v in cands) or 'none (see the model overrides)'}.")
    dev = resolve_device(device, env.local_rank)
    comm.init(dev, env, probe.launch.collective_timeout_s)
    if any(v.zero and v.zero.startswith("ds-") for v in chosen):
        if dev.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # noqa: F401 - now, so that its per-rank info lines can be turned down
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed 0.19 calls collectives torch 2.13 deprecates: one warning per call and rank.
        warnings.filterwarnings("ignore", r".*is deprecated\. Please use `torch\.distributed", FutureWarning)
    main = env.rank == 0
    say = _say if main else (lambda *a: None)
    scratch = Path(tempfile.mkdtemp(prefix=f"megatron_lite_verify_{env.rank}_"))
    rows: list[Row] = []
    try:
        data_dir = scratch / "data"
        g = global_batch(world)
        write_token_store(data_dir, probe.model.vocab_size, probe.seq_length, g * steps + 1, g)
        # The serial reference: this rank alone, on its own device (RunEnv of one process).
        serial_env = RunEnv(local_rank=env.local_rank, local_world_size=env.local_world_size,
                            source="explicit")
        t0 = time.perf_counter()
        ref = train_run(make_config(None, world, steps, str(data_dir), str(scratch / "serial"),
                                    model_overrides, device), serial_env, steps)
        names = sorted(dict(ref.trainer.model.named_parameters()))  # each tied weight once
        say(f"verify: {len(chosen)} layouts at world size {world} ({dev.type}) against the serial model "
            f"({probe.model.num_layers} layers, hidden {probe.model.hidden_size}, vocab "
            f"{probe.model.vocab_size}, {steps} AdamW steps of {global_batch(world)} x {probe.seq_length} "
            f"tokens; serial run {time.perf_counter() - t0:.1f}s)" +
            ("" if have_ds else "; DeepSpeed is not installed: its ZeRO layouts are skipped"))
        for shape, reason in unfit.items():
            say(f"not verified: {shape} does not fit this model: {reason}")
        t = TOLERANCES
        say(f"tolerances (fp32): loss {t['loss']:g} x |loss|, norm {t['norm']:g} x norm, grad "
            f"{t['grad']:g} x max|grad| of each tensor, param {t['param']:g} x sum of lr = "
            f"{t['param'] * adam_movement(ref.trainer.cfg, steps):.2g}; worst/tol > 1 fails")
        width = max(len("layout"), *(len(v.name) for v in chosen))
        say(format_header(width))
        for v in chosen:
            row = _verify_one(v, env, world, steps, data_dir, scratch, model_overrides, device, ref, names)
            rows.append(row)
            say(format_row(row, width))
        wall = time.perf_counter() - started
        failed = [r.name for r in rows if not r.passed]
        say(f"verify: {len(rows) - len(failed)} of {len(rows)} layouts match the serial run"
            + (f"; FAILED: {', '.join(failed)}" if failed else "") + f" ({wall:.1f}s)")
        if main and json_path:
            Path(json_path).write_text(json.dumps({
                "world_size": world, "device": dev.type, "steps": steps, "global_batch": global_batch(world),
                "tolerances": TOLERANCES, "model": vars(probe.model), "model_overrides": model_overrides,
                "serial": {"losses": ref.losses, "grad_norms": ref.norms, "val_loss": ref.val_loss},
                "not_verified": unfit, "wall_s": round(wall, 3), "passed": not failed,
                "layouts": [r.as_dict() for r in rows]}, indent=2) + "\n")
        return 1 if failed else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _verify_one(v: Variant, env: RunEnv, world: int, steps: int, data_dir: Path, scratch: Path,
                model_overrides: list[str], device: str, ref: Run, names: list[str]) -> Row:
    t0 = time.perf_counter()
    cfg = make_config(v, world, steps, str(data_dir), str(scratch / v.name.replace(":", "_")),
                      model_overrides, device)
    error = ""
    result = None
    losses: list[float] = []
    try:
        run = train_run(cfg, env, steps)
        losses = list(run.losses)
        result = compare(run, ref, env.rank)
        del run
    except Exception as e:  # noqa: BLE001 - a layout that crashes is a failed layout; the others go on
        if comm.is_peer_failure(e):
            raise
        lines = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # Every rank's findings to rank 0 (small objects); also where the ranks meet between layouts.
    everyone = comm.all_gather_object({"result": result, "error": error,
                                       "seconds": time.perf_counter() - t0}, comm.world())
    merged = {k: Diff() for k in TOLERANCES}
    compared: dict[str, set[str]] = {"grad": set(), "param": set()}
    errors = [f"rank {i}: {r['error']}" for i, r in enumerate(everyone) if r["error"]]
    for r in everyone:
        if r["result"] is not None:
            for k, d in r["result"]["diffs"].items():
                merged[k].merge(d)
            for k, seen in r["result"]["compared"].items():
                compared[k] |= seen
    for kind, seen in compared.items():  # every serial tensor must have been compared by some rank
        missing = [n for n in names if n not in seen]
        if missing and not errors:
            errors.append(f"no rank compared the {kind} of {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}")
    return Row(v.name, merged["loss"], merged["norm"], merged["grad"], merged["param"],
               max(r["seconds"] for r in everyone), "; ".join(errors[:2]), losses)
