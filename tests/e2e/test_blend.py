"""Training on a blend of three corpora end to end: stopped and resumed, killed and resumed (bit for
bit against an uninterrupted run), and split over two data-parallel ranks under torchrun."""

from __future__ import annotations

import json
import logging
import os
import re
import signal

import pytest
import torch

from megatron_lite.config import Config
from megatron_lite.data import prepare
from megatron_lite.data.prepare import stdlib_files
from megatron_lite.testing.faults import finish, overrides, start, train_argv, wait_step
from megatron_lite.train import Trainer
from tests.conftest import ROOT
from tests.e2e.faults import losses, run

WEIGHTS = (0.6, 0.3, 0.1)


@pytest.fixture(scope="module")
def blend(corpus_dir, tmp_path_factory) -> str:
    """data.blend of three sources with the session corpus's tokenizer: the head of the stdlib (the
    session corpus itself), its tail (other modules) and this project's Markdown documentation."""
    root = tmp_path_factory.mktemp("blend")
    tail, size = [], 0
    for f in reversed(stdlib_files(None)):  # the corpus fixture holds the first 400 kB
        if size > 150_000:
            break
        tail.append(str(f))
        size += f.stat().st_size
    docs = [str(ROOT / "README.md"), *(str(p) for p in sorted((ROOT / "docs").glob("*.md")))]
    tokenizer = str(corpus_dir / "tokenizer.json")
    stdlib_tail = prepare(tail, root / "stdlib_tail", tokenizer=tokenizer)
    markdown = prepare(docs, root / "markdown", tokenizer=tokenizer)
    dirs = (corpus_dir, stdlib_tail, markdown)
    return "data.blend=[" + ", ".join(f"[{w}, {d}]" for w, d in zip(WEIGHTS, dirs, strict=True)) + "]"


def test_stopped_and_resumed_blend_is_bit_exact(tiny_config, blend, tmp_path, caplog):
    """16 steps straight == 8, stop, resume, 8 (dropout on, two micro-batches per step); the resume
    finds each source's saved cursor where the schedule puts it. A changed blend is resumed on its
    own schedule, with a warning naming both."""
    common = [blend, "model.dropout=0.1", "train.grad_accum=2", "train.steps=16", "checkpoint.interval=100"]
    straight = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'a'}"))
    full = straight.fit()
    part1 = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'b'}", "train.exit_interval=8")).fit()
    with caplog.at_level("INFO", logger="megatron_lite"):
        second = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'b'}"))
    assert second.state.cursor == 64 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert second.state.extra["data_sources"] == {
        "stdlib_small": {"weight": 0.6, "samples": 39}, "stdlib_tail": {"weight": 0.3, "samples": 19},
        "markdown": {"weight": 0.1, "samples": 6}}
    part2 = second.fit()
    assert part1["train_loss"] + part2["train_loss"] == full["train_loss"]  # exact float equality
    assert part2["val_loss_sources"][-1] == full["val_loss_sources"][-1]
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # The same run directory with other weights: resumed, on the new schedule, with a warning.
    other = blend.replace("[0.6, ", "[0.2, ")
    caplog.clear()
    with caplog.at_level("WARNING", logger="megatron_lite"):
        Trainer(tiny_config(*common, other, "train.steps=20", f"train.out_dir={tmp_path / 'b'}")).close()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("warning: at sample 128 the checkpoint's data sources had given stdlib_small "
                              "77 (weight 0.6), stdlib_tail 38 (weight 0.3), markdown 13 (weight 0.1); this "
                              "run's data gives stdlib_small 43 (weight 0.2), stdlib_tail 64"), warning


@pytest.mark.slow
def test_killed_blend_run_resumes_bit_for_bit(blend, corpus_dir, tmp_path):
    """SIGKILL mid-run (no stop, no final checkpoint): the rerun resumes from the newest periodic
    checkpoint, redoes the steps the killed run did past it identically, and ends with the
    uninterrupted run's losses and per-source validation losses."""
    steps, every = 300, 20
    ovr = overrides(corpus_dir, tmp_path / "run", f"train.steps={steps}", f"checkpoint.interval={every}",
                    "model.dropout=0.1", blend)
    proc = start(train_argv(*ovr), tmp_path / "a.log")
    wait_step(tmp_path / "run", 2 * every + 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    code, text = finish(proc, tmp_path / "a.log")
    assert code == -signal.SIGKILL, text[-3000:]
    killed = {r["step"]: r["train/loss"] for r in _rows(tmp_path / "run") if "train/loss" in r}
    assert max(killed) < steps
    code, text = run(train_argv(*ovr), tmp_path / "b.log")
    assert code == 0, text[-3000:]
    resumed_at = int(re.search(r"resumed from \S+ \(step (\d+),", text).group(1))
    assert resumed_at % every == 0 and resumed_at <= max(killed), text[-3000:]
    code, ref_text = run(train_argv(*overrides(corpus_dir, tmp_path / "ref", f"train.steps={steps}",
                                               f"checkpoint.interval={every}", "model.dropout=0.1", blend)),
                         tmp_path / "ref.log")
    assert code == 0, ref_text[-3000:]
    reference = losses(tmp_path / "ref")
    assert losses(tmp_path / "run") == reference
    assert [killed[s] for s in sorted(killed)] == reference[:len(killed)]  # the redone steps too
    last = [r for r in _rows(tmp_path / "run") if "val/loss" in r][-1]
    ref_last = [r for r in _rows(tmp_path / "ref") if "val/loss" in r][-1]
    names = ("stdlib_small", "stdlib_tail", "markdown")
    assert last["step"] == steps and {k: v for k, v in last.items() if k.startswith("val/")} == \
        {k: v for k, v in ref_last.items() if k.startswith("val/")}
    assert {f"val/{n}/loss" for n in names} <= set(last)


@pytest.mark.slow
def test_data_parallel_blend_matches_serial_and_resumes(blend, corpus_dir, tmp_path):
    """dp=2 under torchrun, stopped at step 6 and resumed to 12: each rank takes its slice of every
    blended global batch, so the losses are those of one process taking the whole batch (up to the
    order of the gradient sum)."""
    common = ("train.steps=12", "optim.warmup_steps=2", blend)
    ovr = overrides(corpus_dir, tmp_path / "dp2", "parallel.dp=2", *common)
    torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    code, text = run([*torchrun, *train_argv(*ovr, "train.exit_interval=6")], tmp_path / "a.log")
    assert code == 0 and "train.exit_interval=6 steps done" in text, text[-3000:]
    code, text = run([*torchrun, *train_argv(*ovr)], tmp_path / "b.log")
    assert code == 0 and "resumed from" in text, text[-3000:]
    # The CLI's configs/tiny.yaml with the same overrides, one micro-batch of both ranks' samples.
    serial = Config.from_yaml(ROOT / "configs/tiny.yaml", overrides(corpus_dir, tmp_path / "serial",
                                                                    "data.micro_batch_size=8", *common))
    assert losses(tmp_path / "dp2") == pytest.approx(Trainer(serial).fit()["train_loss"], rel=1e-5)


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
