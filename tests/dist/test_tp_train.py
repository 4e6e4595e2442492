"""`megatron-lite train` with tensor parallelism under torchrun, end to end (gloo, 2 ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.testing import tiny_overrides
from tests.conftest import ROOT, cli


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # faulthandler: a rank that dies of a signal (e.g. SIGABRT) prints every thread's Python stack.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-20000:]
    return r


def train(tmp_path: Path, name: str, nproc: int, *overrides: str) -> dict:
    out = tmp_path / f"{name}.json"
    torchrun(nproc, "tests/dist/train_script.py", str(out), *overrides)
    return json.loads(out.read_text())


def train_serial(tmp_path: Path, name: str, *overrides: str, timeout: int = 600) -> dict:
    """train() as one plain process, no torchrun (the serial reference runs: what `megatron-lite
    train` does without a launcher; one process start-up fewer than torchrun with one rank)."""
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    r = subprocess.run([sys.executable, "tests/dist/train_script.py", str(out), *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-20000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tp2_training_matches_serial_and_resumes_exactly(tiny_config, corpus_dir, tmp_path):
    base = tiny_overrides(corpus_dir, "train.steps=12", "train.eval_interval=6", "optim.warmup_steps=3",
                          "log.interval=3")
    serial = train_serial(tmp_path, "serial", *base, f"train.out_dir={tmp_path / 's'}")
    tp = train(tmp_path, "tp", 2, *base, "parallel.tp=2", f"train.out_dir={tmp_path / 't'}")
    # Same model, same batches: fp32 losses agree to summation-order rounding (~1e-6 relative).
    assert tp["train_loss"] == pytest.approx(serial["train_loss"], rel=1e-5)
    assert [v for _, v in tp["val_loss"]] == pytest.approx([v for _, v in serial["val_loss"]], rel=1e-5)

    # Sequence parallel + dropout: 12 straight steps == 6, stop, resume, 6 — bit for bit.
    sp = base + ["parallel.tp=2", "parallel.sequence_parallel=true", "model.dropout=0.1"]
    straight = train(tmp_path, "sp", 2, *sp, f"train.out_dir={tmp_path / 'a'}")
    first = train(tmp_path, "sp1", 2, *sp, f"train.out_dir={tmp_path / 'b'}", "train.exit_interval=6")
    second = train(tmp_path, "sp2", 2, *sp, f"train.out_dir={tmp_path / 'b'}")
    assert second["resumed"] and len(first["train_loss"]) == 6
    assert first["train_loss"] + second["train_loss"] == straight["train_loss"]
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000012"
    assert (ckpt / "rank_00000.safetensors").is_file() and (ckpt / "rank_00001.safetensors").is_file()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["layout"]["tp"] == 2

    # A tp=2 checkpoint generates single-process (consolidated) exactly like its serial twin.
    g_tp = cli("generate", "--checkpoint", str(tmp_path / "t"), "--prompt", "def ", "--max-new-tokens", "12",
               "--temperature", "0")
    g_serial = cli("generate", "--checkpoint", str(tmp_path / "s"), "--prompt", "def ", "--max-new-tokens", "12",
                   "--temperature", "0")
    assert g_tp.returncode == 0 and g_tp.stdout == g_serial.stdout, (g_tp.stderr, g_serial.stderr)

    # Resuming at another layout reshards the tp=2 checkpoint onto one process, saying so.
    r = torchrun(1, "-m", "megatron_lite.cli", "train", "--config", "configs/tiny.yaml",
                 *base, "model.dropout=0.1", f"train.out_dir={tmp_path / 'b'}", "train.steps=14")
    assert "resharded" in r.stdout and "tp=2" in r.stdout and "now tp=1" in r.stdout, r.stdout


@pytest.mark.slow
def test_cli_under_torchrun_tp2_trains(corpus_dir, tmp_path):
    r = torchrun(2, "-m", "megatron_lite.cli", "train", "--config", "configs/tiny.yaml", "parallel.tp=2",
                 "parallel.sequence_parallel=true", f"data.dir={corpus_dir}", "model.vocab_size=512",
                 f"train.out_dir={tmp_path / 'run'}", "train.steps=40", "train.eval_interval=20",
                 "train.progress=false", "train.sample_tokens=10", "checkpoint.interval=20", "optim.warmup_steps=5")
    assert r.stdout.count("validation loss: first") == 1  # rank 0 alone reports
    first, last = (float(x.split()[0]) for x in r.stdout.split("validation loss: first ")[1].split("-> last ")[:2])
    assert last < first - 0.5
    assert "---- sample ----" in r.stdout
