"""Running the CLI as a user's launcher would, and hurting it: signals, killed and stalled ranks.

Every helper works on processes the caller started (by pid), never by name. The commands run in the
source checkout (ROOT: configs/tiny.yaml is read from there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..distributed.env import child_environ, parent_pids
from ..train.metrics import read_metrics
from . import ROOT, tiny_overrides


def overrides(data_dir, out_dir, *extra: str) -> list[str]:
    """A tiny model logging every step's loss to out_dir/metrics.jsonl; no evaluation or periodic
    checkpoint in its first 10000 steps (a stop still saves one)."""
    return tiny_overrides(data_dir, f"train.out_dir={out_dir}", "log.interval=1", "train.eval_interval=10000",
                          "checkpoint.interval=100000", "log.tensorboard=false", *extra)


def start(argv: list[str], log_path: Path, prefix: list[str] = (), **extra_env: str) -> subprocess.Popen:
    """`[prefix] python -m <argv>` in the background (its own session), output to log_path."""
    env = child_environ(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **extra_env)
    with open(log_path, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([*prefix, sys.executable, "-m", *argv], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def train_argv(*ovr: str) -> list[str]:
    return ["megatron_lite.cli", "train", "--config", "configs/tiny.yaml", *ovr]


def torchrun_argv(*ovr: str, launcher: list[str] = ()) -> list[str]:
    return ["megatron_lite.cli", "launch", "torchrun", *launcher, "--config", "configs/tiny.yaml", *ovr]


def wait_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Block until rank 0 has logged `step` (returns the newest logged step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = read_metrics(out_dir, "train/loss")
        if done and max(done) >= step:
            return max(done)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def finish(proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> tuple[int, str]:
    """Wait for proc (killing its session after `timeout`): its exit status and its log."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"still running after {timeout} s:\n{log_path.read_text()[-3000:]}") from None
    return proc.returncode, log_path.read_text()


def children(pid: int) -> list[int]:
    """Direct children of pid (from /proc: no name matching)."""
    return sorted(child for child, parent in parent_pids().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """Every process below pid (children, theirs, ...), from one snapshot of /proc."""
    parents = parent_pids()
    out, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        out += frontier
    return sorted(out)


def kill_node(pid: int) -> list[int]:
    """A node dying: SIGKILL to a launcher and every process below it at once (torchrun's workers
    run in sessions of their own, so a process-group kill would leave them); the pids killed."""
    victims = [pid, *descendants(pid)]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def hurt_one_rank(argv: list[str], log_path: Path, out: Path, how: str, timeout: float) -> dict:
    """Start a 2-rank torchrun job, SIGKILL ("kill") or SIGSTOP ("stall") rank 1 once rank 0 has
    logged step 10; the exit status, the log, and the seconds until rank 0 had exited and until
    every process had (the stalled one is the launcher's to kill)."""
    proc = start(argv, log_path)
    wait_step(out, 10, proc)
    rank0, rank1 = children(proc.pid)
    t0 = time.monotonic()
    os.kill(rank1, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    while alive(rank0):
        time.sleep(0.01)
        assert time.monotonic() - t0 < timeout + 60, "rank 0 still running"
    rank0_s = time.monotonic() - t0
    code, text = finish(proc, log_path, timeout=timeout + 120)
    while alive(rank1) and time.monotonic() - t0 < timeout + 120:
        time.sleep(0.01)
    return {"code": code, "log": text, "other_rank_exit_s": rank0_s, "job_exit_s": time.monotonic() - t0,
            "hurt_rank_alive": alive(rank1)}
