"""Preemption and failures, end to end through the CLI and torchrun (gloo, 2 ranks on this machine).

- a stop signal (SIGTERM, SIGUSR1) to one process or to the torchrun agent: every rank stops at the
  same step with a checkpoint, the requeue status comes back, and a rerun continues bit for bit;
- a rank killed (SIGKILL) or stalled (SIGSTOP): the others exit non-zero within the collective
  timeout naming the failure; with --max-restarts the run completes with the uninterrupted losses;
- the torchrun agent killed: its workers stop (with a checkpoint) instead of training on;
- a bad config under the launcher: one sentence, exit 2, no worker started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from megatron_lite.checkpoint import CheckpointManager
from megatron_lite.testing.faults import (
    alive,
    children,
    finish,
    hurt_one_rank,
    overrides,
    start,
    torchrun_argv,
    train_argv,
    wait_step,
)
from tests.conftest import ROOT
from tests.e2e.faults import losses, run

pytestmark = pytest.mark.slow
TIMEOUT = 8  # launch.collective_timeout_s of the failure tests


def test_sigterm_single_process_checkpoints_and_resumes_exactly(corpus_dir, tmp_path):
    out, steps = tmp_path / "run", 600  # ~4 s of steps: still training when SIGTERM comes at step 20
    ovr = overrides(corpus_dir, out, f"train.steps={steps}", "model.dropout=0.1")
    # The uninterrupted reference (one process) runs meanwhile, on the other core.
    ref = tmp_path / "reference"
    uninterrupted = start(train_argv(*overrides(corpus_dir, ref, f"train.steps={steps}",
                                                "model.dropout=0.1")), tmp_path / "reference.log")
    try:
        proc = start(train_argv(*ovr), tmp_path / "a.log")
        wait_step(out, 20, proc)
        proc.send_signal(signal.SIGTERM)
        code, text = finish(proc, tmp_path / "a.log")
        assert code == 75, text[-3000:]  # launch.requeue_exit_code: stopped early, resumable
        marker = json.loads((out / "requeue.json").read_text())
        stopped = marker["step"]
        assert 20 <= stopped < steps and "SIGTERM received" in marker["reason"]
        assert marker["checkpoint"].endswith(f"step_{stopped:08d}")
        assert f"stopping at step {stopped}: SIGTERM received" in text
        code, text = run(train_argv(*ovr), tmp_path / "b.log")
        assert code == 0, text[-3000:]
        assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'}" in text
        assert not (out / "requeue.json").exists()  # answered by the rerun
    finally:
        ref_code, ref_text = finish(uninterrupted, tmp_path / "reference.log")
    assert ref_code == 0, ref_text[-3000:]
    assert losses(out) == losses(ref)


def test_sigterm_to_plain_torchrun_checkpoints_and_resumes_exactly(corpus_dir, tmp_path):
    """The user's own `torchrun ... -m megatron_lite.cli train`: the agent forwards SIGTERM."""
    out, steps = tmp_path / "run", 500  # still training when SIGTERM comes at step 20
    ovr = overrides(corpus_dir, out, f"train.steps={steps}", "parallel.dp=2")
    torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", *train_argv(*ovr)]
    proc = start(torchrun, tmp_path / "a.log")
    wait_step(out, 20, proc)
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc, tmp_path / "a.log")
    assert code != 0  # torchrun reports its own signal
    stopped = json.loads((out / "requeue.json").read_text())["step"]
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file(), text[-3000:]
    assert f"stopping at step {stopped}: SIGTERM received" in text
    code, text = run(torchrun, tmp_path / "b.log")
    assert code == 0, text[-3000:]
    # dp=2 sums gradients in another order than one process: the reference is a dp=2 run too.
    ref = tmp_path / "ref_dp2"
    code, text = run(["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                      *train_argv(*overrides(corpus_dir, ref, f"train.steps={steps}", "parallel.dp=2"))],
                     tmp_path / "ref.log")
    assert code == 0, text[-3000:]
    assert losses(out) == losses(ref)


def test_sigusr1_to_the_launcher_reaches_every_rank_and_returns_the_requeue_status(corpus_dir, tmp_path):
    """SLURM's `--signal=USR1@T` reaches the agent: without help torchrun dies of it and orphans its
    workers. Our launcher has the agent forward it; the workers checkpoint; status 75."""
    out = tmp_path / "run"
    proc = start(torchrun_argv(*overrides(corpus_dir, out, "train.steps=100000", "parallel.tp=2")),
                 tmp_path / "a.log")
    wait_step(out, 10, proc)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    proc.send_signal(signal.SIGUSR1)
    code, text = finish(proc, tmp_path / "a.log")
    assert code == 75, text[-3000:]
    stopped = json.loads((out / "requeue.json").read_text())["step"]
    assert f"stopping at step {stopped}: SIGUSR1 received on rank" in text
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file()
    assert not any(alive(w) for w in workers)


def test_a_bad_config_is_one_sentence_before_any_worker_starts(corpus_dir, tmp_path):
    out = tmp_path / "run"
    code, text = run(torchrun_argv(*overrides(corpus_dir, out, "parallel.tp=3"), launcher=["--nnodes", "1"]),
                     tmp_path / "a.log", timeout=120)
    assert code == 2
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.num_attention_heads"), text
    code, text = run(torchrun_argv(*overrides(corpus_dir, out, "parallel.dp=2"),
                                   launcher=["--nproc-per-node", "3"]), tmp_path / "b.log", timeout=120)
    assert code == 2 and text.count("error:") == 1 and "Traceback" not in text, text
    assert "1 nodes x 3 processes per node = 3, but parallel.tp=1 x cp=1 x pp=1 x dp=2 = 2" in text


def test_a_bad_config_under_plain_torchrun_is_said_once(corpus_dir, tmp_path):
    """The user's own torchrun (no launcher preflight): both ranks fail the same check, exit 2, and
    the first process of the node alone prints the sentence."""
    torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                *train_argv(*overrides(corpus_dir, tmp_path / "run", "parallel.dp=2", "optim.lr=-1"))]
    code, text = run(torchrun, tmp_path / "a.log", timeout=180)
    assert code != 0
    errors = [line for line in text.splitlines() if "error:" in line]
    assert errors == ["error: optim.lr=-1.0 must be positive."], text
    assert "exitcode  : 2" in text and "]: Traceback" not in text, text


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_dead_or_stalled_rank_ends_every_rank_within_the_timeout(corpus_dir, tmp_path, how):
    out = tmp_path / "run"
    ovr = overrides(corpus_dir, out, "train.steps=100000", "parallel.dp=2",
                    f"launch.collective_timeout_s={TIMEOUT}")
    r = hurt_one_rank(torchrun_argv(*ovr), tmp_path / "a.log", out, how, TIMEOUT)
    code, text, rank0_s, all_s = r["code"], r["log"], r["other_rank_exit_s"], r["job_exit_s"]
    assert code == 1, text[-3000:]
    assert "error: rank 0: a collective failed" in text and "another rank died, stalled" in text
    if how == "stall":
        # gloo words the timeout two ways: the operation that hit it ("Timed out waiting ...") and
        # one that shared its connection, closed by it ("Application timeout caused pair closure"),
        # which is what a rank sees first when another of its collectives (an overlapped gradient
        # reduction) was in flight at the same time.
        first = next(line for line in text.splitlines() if "a collective failed" in line)
        assert ("Timed out" in first or "timeout caused pair closure" in first) \
            and rank0_s >= TIMEOUT - 1, first
    assert rank0_s < TIMEOUT + 5, rank0_s
    # The stalled rank cannot act: torchrun kills it after its fixed 30 s shutdown wait.
    assert all_s < TIMEOUT + 30 + 5, all_s
    assert not r["hurt_rank_alive"]
    print(f"{how}: rank 0 exited after {rank0_s:.1f} s, the job after {all_s:.1f} s (timeout {TIMEOUT} s)")


# bf16 weights with the distributed optimizer (fp32 main gradients, masters and moments sharded
# over dp): what a checkpoint stores (fp32 masters) brings back the bf16 weights bit for bit.
BF16_ZERO1 = ("train.precision=bf16", "optim.zero.stage=1")


def test_max_restarts_resumes_from_the_newest_checkpoint_with_the_same_losses(corpus_dir, tmp_path):
    """A rank SIGKILLed mid-run under bf16 + the distributed optimizer; torchrun restarts the job
    from the newest checkpoint and the losses equal the uninterrupted run's, bit for bit."""
    out, steps = tmp_path / "run", 500  # killed at step >= 250; resumes from a checkpoint
    ovr = overrides(corpus_dir, out, f"train.steps={steps}", "parallel.dp=2", "checkpoint.interval=100",
                    f"launch.collective_timeout_s={TIMEOUT}", *BF16_ZERO1)
    proc = start(torchrun_argv(*ovr, launcher=["--max-restarts", "1"]), tmp_path / "a.log")
    wait_step(out, 250, proc)
    first = children(proc.pid)
    os.kill(first[1], signal.SIGKILL)
    code, text = finish(proc, tmp_path / "a.log")
    assert code == 0, text[-3000:]
    assert "resumed from" in text and f"reached train.steps={steps}" in text
    ref = tmp_path / "reference"
    code, text = run(torchrun_argv(*overrides(corpus_dir, ref, f"train.steps={steps}", "parallel.dp=2",
                                              *BF16_ZERO1)), tmp_path / "ref.log")
    assert code == 0, text[-3000:]
    assert losses(out) == losses(ref)


def test_workers_of_a_dead_launcher_stop_with_a_checkpoint(corpus_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(torchrun_argv(*overrides(corpus_dir, out, "train.steps=100000", "parallel.dp=2")),
                 tmp_path / "a.log")
    wait_step(out, 10, proc)
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    while any(alive(w) for w in workers):
        assert time.monotonic() - t0 < 60, "orphaned workers still training"
        time.sleep(0.1)
    time.sleep(0.5)
    text = (tmp_path / "a.log").read_text()
    assert "is gone: stopping with a checkpoint" in text, text[-3000:]
    stopped = json.loads((out / "requeue.json").read_text())["step"]
    assert "its launcher died" in json.loads((out / "requeue.json").read_text())["reason"]
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file()


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_a_second_training_on_one_out_dir_is_refused_and_a_killed_ones_lock_is_free(corpus_dir, tmp_path):
    """Single processes: the second `train` on a busy train.out_dir is one sentence naming the first
    (pid, host), exit 2, before it reads anything; the first trains on alone. Killed, the first
    leaves no stale lock: the next run takes it at once and resumes from its newest checkpoint."""
    out = tmp_path / "run"
    ovr = overrides(corpus_dir, out, "train.steps=100000", "checkpoint.interval=20")
    first = start(train_argv(*ovr), tmp_path / "a.log")
    wait_step(out, 5, first)
    code, text = run(train_argv(*ovr), tmp_path / "b.log", timeout=120)
    assert code == 2, text
    assert _one_line(text).startswith(f"error: run directory {str(out)!r} is in use by another training "
                                      f"(pid {first.pid} on {socket.gethostname()}, since ")
    wait_step(out, wait_step(out, 5, first) + 30, first)  # still training, alone
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert json.loads((out / "run.lock").read_text())["pid"] == first.pid  # the file stays, the lock is gone
    newest = int(CheckpointManager(out / "checkpoints").latest().name.split("_")[1])
    code, text = run(train_argv(*overrides(corpus_dir, out, f"train.steps={newest + 5}",
                                           "checkpoint.interval=20")), tmp_path / "c.log")
    assert code == 0 and f"resumed from {out / 'checkpoints' / f'step_{newest:08d}'}" in text, text[-3000:]
    assert len(losses(out)) >= newest + 5  # every step logged, in order (the killed run's beyond step_N too)


def test_a_second_torchrun_job_on_one_out_dir_is_refused_and_the_first_goes_on(corpus_dir, tmp_path):
    """2 ranks: our launcher refuses before it starts a worker (one sentence); under plain torchrun
    the second job's workers refuse before any process group; the first job trains on untouched."""
    out = tmp_path / "run"
    ovr = overrides(corpus_dir, out, "train.steps=100000", "parallel.dp=2")
    first = start(torchrun_argv(*ovr), tmp_path / "a.log")
    wait_step(out, 5, first)
    code, text = run(torchrun_argv(*ovr), tmp_path / "b.log", timeout=120)
    assert code == 2 and _one_line(text).startswith(f"error: run directory {str(out)!r} is in use"), text
    plain = ["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", *train_argv(*ovr)]
    code, text = run(plain, tmp_path / "c.log", timeout=180)
    assert code != 0 and f"error: run directory {str(out)!r} is in use by another training (pid " in text
    assert f'File "{ROOT / "megatron_lite"}' not in text, text  # torchrun's own report aside: no traceback
    reached = wait_step(out, wait_step(out, 5, first) + 30, first)
    first.send_signal(signal.SIGTERM)
    code, text = finish(first, tmp_path / "a.log")
    assert code == 75, text[-3000:]
    stopped = json.loads((out / "requeue.json").read_text())["step"]
    assert stopped >= reached and len(losses(out)) == stopped  # one run's steps, in order
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file()
