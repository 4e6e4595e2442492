"""One training per run directory (checkpoint/lock.py): rank 0 holds an exclusive flock on
RUN/run.lock, a second holder is refused in one sentence naming the first's pid and host, the other
ranks of the job that holds it pass while every rank of another job is refused before any process
group exists, and a killed holder's lock is free at once."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import megatron_lite.checkpoint.lock as lock_module
from megatron_lite.checkpoint import CheckpointError, RunLock
from megatron_lite.distributed.env import RunEnv
from tests.conftest import ROOT

HOST = socket.gethostname()


def test_a_second_holder_is_refused_naming_the_first_until_it_releases(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "ACQUIRE_S", 0.1)
    first = RunLock(tmp_path / "run", job="a").acquire()
    with pytest.raises(CheckpointError) as e:
        RunLock(tmp_path / "run", job="b").acquire()
    text = str(e.value)
    assert text.startswith(f"run directory {str(tmp_path / 'run')!r} is in use by another training (pid "
                           f"{os.getpid()} on {HOST}, this very process, since ")
    assert "wait for it to end or choose another train.out_dir." in text and "\n" not in text
    first.release()
    with RunLock(tmp_path / "run", job="b") as second:
        assert second.held
    assert not second.held


def test_ranks_of_the_holding_job_pass_and_others_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "PROBE_S", 0.1)
    RunLock(tmp_path / "fresh", job="a").check_free()  # no lock file: free, and none is created
    assert not (tmp_path / "fresh").exists()
    held = RunLock(tmp_path / "run", job="a").acquire()
    RunLock(tmp_path / "run", job="a").check_free()  # rank 1 of the same job
    for job in ("b", ""):  # another job's rank; a launcher's preflight (no job of its own)
        with pytest.raises(CheckpointError, match=f"is in use by another training \\(pid {os.getpid()}"):
            RunLock(tmp_path / "run", job=job).check_free()
    held.release()
    RunLock(tmp_path / "run", job="b").check_free()
    RunLock(tmp_path / "run", job="b").acquire().release()  # the probes left nothing held


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    """'Stale after a crash' needs no detection: the kernel drops the flock with the process."""
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time\n"
        "from megatron_lite.checkpoint import RunLock\n"
        f"held = RunLock({str(tmp_path / 'run')!r}, job='crashing').acquire()\n"
        f"pathlib.Path({str(ready)!r}).write_text('held')\n"
        "time.sleep(600)\n")], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not start"
            time.sleep(0.05)
        with pytest.raises(CheckpointError, match=f"pid {holder.pid} on {HOST}"):
            RunLock(tmp_path / "run").check_free()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path / "run", job="next"):
        pass
    assert f'"pid": {holder.pid}' not in (tmp_path / "run" / "run.lock").read_text()  # the new holder's


def test_a_second_trainer_is_refused_before_any_process_group(tiny_config, tmp_path, monkeypatch):
    from megatron_lite.train import Trainer
    from megatron_lite.train.trainer import preflight
    short = ("train.steps=2", "optim.warmup_steps=1")
    monkeypatch.setattr(lock_module, "ACQUIRE_S", 0.1)
    monkeypatch.setattr(lock_module, "PROBE_S", 0.1)
    first = Trainer(tiny_config(*short))
    with pytest.raises(CheckpointError, match="is in use by another training"):
        Trainer(tiny_config(*short))
    with pytest.raises(CheckpointError, match="is in use by another training"):
        preflight(tiny_config(*short), 1)
    # Rank 1 of another 2-rank job: refused before it would wait for its peers in init_process_group.
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="is in use by another training"):
        Trainer(tiny_config(*short, "parallel.dp=2"),
                RunEnv(rank=1, world_size=2, local_rank=1, local_world_size=2, master_port=1,
                       source="explicit"))
    assert time.monotonic() - t0 < 10
    first.fit()  # releases the run directory when it ends
    assert Trainer(tiny_config(*short)).fit()["train_loss"] == []  # resumed at its last step


def test_a_refused_train_leaves_the_holders_requeue_marker_and_the_holder_answers_it(tmp_path, monkeypatch,
                                                                                      capsys):
    """`train` on a busy run directory exits 2 without touching the first run's requeue.json; the
    run that takes the lock removes the marker (it answers that stop)."""
    from megatron_lite.cli import main
    from megatron_lite.train.trainer import claim_run_dir
    monkeypatch.setattr(lock_module, "ACQUIRE_S", 0.1)
    out = tmp_path / "run"
    out.mkdir()
    marker = out / "requeue.json"
    marker.write_text('{"step": 7, "reason": "SIGUSR1", "checkpoint": "step_00000007"}\n')
    held = RunLock(out, job="first").acquire()
    code = main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"train.out_dir={out}"])
    assert code == 2 and "is in use by another training" in capsys.readouterr().err
    assert marker.read_text().startswith('{"step": 7')
    held.release()
    claim_run_dir(out, RunEnv()).release()
    assert not marker.exists()
