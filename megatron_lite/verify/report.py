"""What verify prints (rank 0: a header, one row per layout as soon as it is known, a summary)
and the JSON file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .compare import Row, adam_movement, tolerances_for
from .select import Selection, global_batch

if TYPE_CHECKING:
    import torch

    from .run import Run

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


def print_now(*parts) -> None:
    print(*parts, flush=True)  # under a launcher stdout is a pipe: each row as soon as it is known


def header(sel: Selection, dev: torch.device, ref: Run, serial_s: float) -> str:
    m, t = sel.probe.model, tolerances_for(sel.precision)
    lines = [f"verify: {len(sel.layouts)} layouts at world size {sel.world} ({dev.type}) against the serial "
             f"model ({m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}, {sel.steps} AdamW "
             f"steps of {global_batch(sel.world)} x {sel.probe.seq_length} tokens; serial run "
             f"{serial_s:.1f}s)" + ("" if sel.deepspeed else "; DeepSpeed is not installed: its ZeRO layouts "
                                                             "are skipped")]
    lines += [f"not verified: {shape} does not fit this model: {why}" for shape, why in sel.unfit.items()]
    lines.append(f"tolerances ({sel.precision}): loss {t['loss']:g} x |loss|, norm {t['norm']:g} x norm, "
                 f"grad "
                 f"{t['grad']:g} x max|grad| of each tensor, param {t['param']:g} x sum of lr = "
                 f"{t['param'] * adam_movement(ref.trainer.cfg, sel.steps):.2g}; worst/tol > 1 fails")
    return "\n".join(lines)


def report(sel: Selection, dev: torch.device, ref: Run, rows: list[Row], wall: float, say,
           json_path: str | None) -> int:
    """The summary line (and the JSON file, when given); returns the exit status (0: all passed)."""
    failed = [r.name for r in rows if not r.passed]
    say(f"verify: {len(rows) - len(failed)} of {len(rows)} layouts match the serial run"
        + (f"; FAILED: {', '.join(failed)}" if failed else "") + f" ({wall:.1f}s)")
    if json_path:
        Path(json_path).write_text(json.dumps({
            "world_size": sel.world, "device": dev.type, "steps": sel.steps,
            "global_batch": global_batch(sel.world), "precision": sel.precision,
            "tolerances": tolerances_for(sel.precision), "model": dataclasses.asdict(sel.probe.model),
            "model_overrides": sel.model_overrides,
            "serial": {"losses": ref.losses, "grad_norms": ref.norms, "val_loss": ref.val_loss},
            "not_verified": sel.unfit, "wall_s": round(wall, 3), "passed": not failed,
            "layouts": [r.as_dict() for r in rows]}, indent=2) + "\n")
    return 1 if failed else 0


