"""How close a layout's run is to the serial one: the tolerances, and one rank's differences."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import Config
from ..optim import lr_at

if TYPE_CHECKING:
    from .run import Run

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
# bf16 (--precision bf16: bf16 weights, fp32 main gradients and masters) against the serial bf16 run.
# Each bf16 rounding is <= 2**-9 relative, but of partial sums that differ per layout: a micro-batch's
# gradient is rounded to bf16 once per micro-batch (the layouts' micro-batches are smaller than the
# serial run's), row-parallel all-reduces add bf16 partials, the pipeline sums the tied embedding's
# two gradients in fp32 where the serial model adds them in bf16, and a norm bias's gradient is a
# sum over tokens with cancellation, so its rounding error is large against its final value. A master
# weight that moves by a fraction of a bf16 ulp differently flips the weight's rounding now and
# then. Measured (CPU, 4 ranks, the default selection, 3 steps): losses <= 2.5e-5 relative, norms
# <= 7.6e-4 relative, gradients <= 4.5% of a tensor's largest entry (a LayerNorm's), weights <= 0.2
# of the summed learning rates. The tolerances sit 2-40x above that; the bugs verify exists for move
# gradients and norms by O(1) and weights by lr per step.
BF16_TOLERANCES = {
    "loss": 1e-3,  # x |serial loss|
    "norm": 5e-3,  # x the serial global gradient norm
    "grad": 1e-1,  # x max |serial gradient| of the same tensor (step 1)
    "param": 1.0,  # x the sum of learning rates (a bf16 ulp of a weight near 1 is 2**-8 = 0.004)
}


def tolerances_for(precision: str) -> dict[str, float]:
    return BF16_TOLERANCES if precision == "bf16" else TOLERANCES

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


def compare(run: Run, ref: Run, rank: int, tol: dict[str, float] = TOLERANCES) -> dict:
    """This rank's differences from the serial run: its scalars, and its slices of each tensor
    against the same slices of the serial tensor."""
    out = {k: Diff() for k in TOLERANCES}
    movement = adam_movement(ref.trainer.cfg, len(ref.losses))
    for i, (got, want) in enumerate(zip(run.losses, ref.losses, strict=True)):
        out["loss"].add(abs(got - want), abs(want), tol["loss"], f"step {i + 1} loss")
    out["loss"].add(abs(run.val_loss - ref.val_loss), abs(ref.val_loss), tol["loss"],
                    "evaluation loss")
    for i, (got, want) in enumerate(zip(run.norms, ref.norms, strict=True)):
        out["norm"].add(abs(got - want), abs(want), tol["norm"], f"step {i + 1} grad norm")
    slicer = run.trainer.slicer  # this rank's tp slice of a tensor-parallel tensor, its ep share of experts
    compared: dict[str, set[str]] = {"grad": set(), "param": set()}
    for kind, mine, serial in (("grad", run.grads, ref.grads), ("param", run.params, ref.params)):
        for name, t in mine.items():
            # a pipeline's last stage holds its own copy of a tied embedding; the serial model one
            full = serial[name if name in serial else "tok_emb.weight"]
            want = slicer(name, full)
            where = f"{kind} {name} (rank {rank})"
            if want.shape != t.shape:
                out[kind].add(math.inf, 1.0, 1.0, f"{where}: shape {tuple(t.shape)} not {tuple(want.shape)}")
                continue
            diff = (t - want).abs().max().item() if t.numel() else 0.0
            scale = full.abs().max().item() if kind == "grad" else movement
            out[kind].add(diff, scale, tol[kind], where)
            compared[kind].add(name)
    return {"diffs": out, "compared": compared}


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


