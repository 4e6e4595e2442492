"""The runs: the serial reference (each rank alone) and every selected layout (the whole job),
through the real Trainer and backend; verify() is select, run, report."""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..distributed import comm
from ..distributed.env import RunEnv
from ..distributed.env import export as export_env
from ..train.trainer import Trainer, resolve_device
from .compare import TOLERANCES, Diff, Row, compare, tolerances_for
from .report import format_header, format_row, header, print_now, report
from .select import Selection, Variant, global_batch, select_layouts

DATA_SEED = 20240917


def write_token_store(directory: Path, vocab_size: int, seq_len: int, train_windows: int,
                      val_windows: int, documents: bool = False) -> None:
    """A token store (meta.json + train/val .bin) of random ids from a fixed seed: the same bytes on
    every rank, so no rank depends on another's filesystem. documents: many short documents (1 to
    seq_len / 2 tokens, the last the separator), so windows pack several; else one document."""
    rng = np.random.default_rng(DATA_SEED)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    eot = vocab_size - 1
    for split, windows in (("train", train_windows), ("val", val_windows)):
        n = windows * seq_len + 1
        ids = rng.integers(0, eot, size=n, dtype=np.int64)  # (n,) no separator by chance
        starts = np.zeros(1, dtype=np.int64)
        if documents:
            lengths = rng.integers(1, max(2, seq_len // 2) + 1, size=n)  # more than enough
            ends = np.cumsum(lengths)
            ends = ends[ends <= n]
            ids[ends - 1] = eot  # each document ends with the separator, as prepare-data writes
            starts = np.concatenate([[0], ends[ends < n]]).astype(np.int64)
        ids = ids.astype(np.uint16)
        ids.tofile(directory / f"{split}.bin")
        np.save(directory / f"{split}.idx.npy", starts)
        splits[split] = {"tokens": int(ids.size), "documents": int(starts.size)}
    meta = {"vocab_size": vocab_size, "eot_id": vocab_size - 1, "dtype": "uint16", "splits": splits,
            "tokenizer": {"type": "verify-random"}}
    (directory / "meta.json").write_text(json.dumps(meta))


@dataclass
class Run:
    """What one run (a layout's, or the serial reference) produced on this rank."""
    trainer: Trainer
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # step 1, local names
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # after the last step


def train_run(cfg: Config, env: RunEnv, steps: int) -> Run:
    trainer = Trainer(cfg, env)
    run = Run(trainer)
    # step 1's finished, unclipped gradients, as the backend hands them to its clipping and update
    grab = trainer.backend.on_grads_finished(
        lambda name, grad: run.grads.__setitem__(name, grad.detach().float().cpu().clone()))
    for _ in range(steps):
        r = trainer.train_step()
        grab.remove()
        run.losses.append(r.loss)
        run.norms.append(r.grad_norm)
    run.val_loss = trainer.evaluate()
    pieces = trainer.backend.stateful()  # DeepSpeed's fp32 masters, through the checkpoint's accessors
    for n, p in trainer.model.named_parameters():
        value = pieces.get_param(p) if pieces.get_param is not None else p
        run.params[n] = value.detach().float().cpu().clone()
    return run


def _join(env: RunEnv, sel: Selection) -> torch.device:
    """This rank's device, in the job's process group (and DeepSpeed loaded quietly if it is needed)."""
    dev = resolve_device(sel.device, env.local_rank)
    comm.init(dev, env, sel.probe.launch.collective_timeout_s)
    if any(v.zero and v.zero.startswith("ds-") for v in sel.layouts):
        if dev.type == "cpu":
            export_env({"DS_ACCELERATOR": "cpu"}, overwrite=False)
        import deepspeed  # noqa: F401 - now, so that its per-rank info lines can be turned down
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed 0.19 calls collectives torch 2.13 deprecates: one warning per call and rank.
        warnings.filterwarnings("ignore", r".*is deprecated\. Please use `torch\.distributed", FutureWarning)
    return dev


def run_layouts(env: RunEnv, sel: Selection, dev: torch.device, scratch: Path, say) -> tuple[Run, list[Row]]:
    """The serial reference (this rank alone), then every selected layout on the whole job; `say`
    prints the header and each row as soon as it is known."""
    data_dir = scratch / "data"
    g = global_batch(sel.world)
    write_token_store(data_dir, sel.probe.model.vocab_size, sel.probe.seq_length, g * sel.steps + 1, g,
                      sel.documents)
    serial_env = RunEnv(local_rank=env.local_rank, local_world_size=env.local_world_size, source="explicit")
    t0 = time.perf_counter()
    ref = train_run(sel.config(None, data_dir, scratch / "serial"), serial_env, sel.steps)
    say(header(sel, dev, ref, time.perf_counter() - t0))
    names = sorted(dict(ref.trainer.model.named_parameters()))  # each tied weight once
    width = max(len("layout"), *(len(v.name) for v in sel.layouts))
    say(format_header(width))
    rows = []
    for v in sel.layouts:
        rows.append(_verify_one(v, env, sel, data_dir, scratch, ref, names))
        say(format_row(rows[-1], width))
    return ref, rows


def verify(env: RunEnv, steps: int = 3, patterns: list[str] | None = None, model_overrides: list[str] = (),
           json_path: str | None = None, device: str = "auto", precision: str = "fp32",
           documents: bool = False, moe: bool = False) -> int:
    """Verify every selected layout on this job; returns the exit status (0: all passed, 1: not)."""
    started = time.perf_counter()
    sel = select_layouts(env.world_size, steps, patterns, model_overrides, device, precision, documents, moe)
    dev = _join(env, sel)
    main = env.rank == 0
    say = print_now if main else (lambda *a: None)
    scratch = Path(tempfile.mkdtemp(prefix=f"megatron_lite_verify_{env.rank}_"))
    try:
        ref, rows = run_layouts(env, sel, dev, scratch, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report(sel, dev, ref, rows, time.perf_counter() - started, say, json_path if main else None)


def _verify_one(v: Variant, env: RunEnv, sel: Selection, data_dir: Path, scratch: Path, ref: Run,
                names: list[str]) -> Row:
    t0 = time.perf_counter()
    cfg = sel.config(v, data_dir, scratch / v.name.replace(":", "_"))
    error = ""
    result = None
    losses: list[float] = []
    try:
        run = train_run(cfg, env, sel.steps)
        losses = list(run.losses)
        result = compare(run, ref, env.rank, tolerances_for(sel.precision))
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

