"""The launchers on real clusters: sbatch scripts from `megatron-lite launch slurm` on the local
one-node SLURM cluster (and the two-node one in network namespaces), preempted and requeued, and
multi-node torchrun across the namespaces. Losses are compared bit for bit with uninterrupted runs
of the same layout (gloo, CPU: deterministic)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lite.testing.cluster import skip_reason
from megatron_lite.testing.faults import (
    descendants,
    finish,
    kill_node,
    overrides,
    start,
    torchrun_argv,
    wait_step,
)
from megatron_lite.train.metrics import read_metrics
from tests.conftest import ROOT
from tests.e2e.faults import losses, run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]


def submit(cluster, *args: str) -> str:
    """`megatron-lite launch slurm ... --submit` as a user runs it; returns the job id."""
    r = subprocess.run([sys.executable, "-m", "megatron_lite.cli", "launch", "slurm", "--submit", *args],
                       cwd=ROOT, env=dict(cluster.env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def job_log(out: Path, job: str) -> str:
    path = out / f"slurm-{job}.out"
    return path.read_text() if path.exists() else "(no job output yet)"


def wait_requeued(cluster, job: str, out: Path, timeout: float = 180) -> None:
    """Wait for the job to be back in the queue after requeueing itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("JobState") == "PENDING" and info.get("Restarts", "0") != "0":
            return
        assert info.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), \
            f"{info.get('JobState')}:\n{job_log(out, job)[-3000:]}"
        time.sleep(0.25)
    raise AssertionError(f"job {job} not requeued: {cluster.job(job)}\n{job_log(out, job)[-3000:]}")


def release(cluster, job: str, out: Path, *more: str) -> None:
    """Let a requeued job start now: SLURM holds it 120 s, and only someone outside the job can
    lift that (here root; on a real cluster the user, with the same command). Not before the first
    run's processes are gone: slurmd refuses to launch a job whose previous incarnation it is still
    tearing down ("Job credential revoked"), and the job fails."""
    deadline = time.monotonic() + 60
    while any(str(out) in cmd for cmd in _cmdlines()):
        assert time.monotonic() < deadline, "the first run's processes are still running"
        time.sleep(0.2)
    time.sleep(3)  # slurmstepd reports the step done after its processes exit (~3 s here)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", *more)


def _cmdlines() -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out


def reference(corpus_dir, tmp_path, steps: int, *extra: str) -> list[float]:
    """The same job uninterrupted, on this node (torchrun through the launcher)."""
    out = tmp_path / "reference"
    code, text = run(torchrun_argv(*overrides(corpus_dir, out, f"train.steps={steps}", *extra)),
                     tmp_path / "reference.log")
    assert code == 0, text[-3000:]
    return losses(out)


def test_sbatch_two_rank_job_completes_with_a_checkpoint(slurm_one_node, corpus_dir, tmp_path):
    out = tmp_path / "run"
    job = submit(slurm_one_node, "--nodes", "1", "--config", "configs/tiny.yaml",
                 *overrides(corpus_dir, out, "train.steps=30", "parallel.dp=2"))
    state = slurm_one_node.wait(job, timeout=240)
    text = job_log(out, job)
    assert state == "COMPLETED", text[-3000:]
    assert "stopping at step 30: reached train.steps=30" in text and "tp 1 pp 1 dp 2" in text
    assert (out / "checkpoints" / "step_00000030" / "manifest.json").is_file()
    assert len(losses(out)) == 30


def test_scancel_usr1_checkpoints_requeues_and_resumes_exactly(slurm_one_node, corpus_dir, tmp_path):
    """`scancel --signal=USR1` reaches the tasks (the torchrun agents, which forward it): every rank
    stops at one step with a checkpoint, the job requeues itself and resumes."""
    out, steps = tmp_path / "run", 600  # still training when scancel comes after step 20
    ovr = overrides(corpus_dir, out, f"train.steps={steps}", "parallel.dp=2")
    job = submit(slurm_one_node, "--nodes", "1", "--config", "configs/tiny.yaml", *ovr)
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 20:
        assert time.monotonic() < deadline, job_log(out, job)[-3000:]
        time.sleep(0.1)
    slurm_one_node.run("scancel", "--signal=USR1", job)
    wait_requeued(slurm_one_node, job, out)
    marker = json.loads((out / "requeue.json").read_text())
    assert (out / "checkpoints" / f"step_{marker['step']:08d}" / "manifest.json").is_file()
    release(slurm_one_node, job, out)
    assert slurm_one_node.wait(job, timeout=240) == "COMPLETED", \
        f"{slurm_one_node.job(job)}\n{job_log(out, job)[-3000:]}"
    text = job_log(out, job)
    assert "SIGUSR1 received" in text and "stopped with a checkpoint: requeueing job" in text
    assert "(restart 1)" in text and "resumed from" in text
    saved = out / "checkpoints" / f"step_{marker['step']:08d}"
    assert f"resumed from {saved}" in text
    assert not (out / "requeue.json").exists()  # answered (removed) by the requeued run
    assert losses(out) == reference(corpus_dir, tmp_path, steps, "parallel.dp=2")


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm_one_node, corpus_dir, tmp_path):
    """`--time=2 --signal=USR1@75`: SLURM signals 75-105 s before the limit (15-45 s into the job);
    the run checkpoints, the job requeues itself; the rerun gets a longer limit and completes."""
    # ~100 s of training on CI's 2 cores (~150 steps/s; >= 50 s at twice that): still running when
    # the signal comes. The LR schedule is pinned (optim.decay_steps), so a shorter uninterrupted run
    # is the reference.
    out, steps = tmp_path / "run", 15000
    schedule = [f"optim.decay_steps={steps}", "log.interval=50"]
    job = submit(slurm_one_node, "--nodes", "1", "--mode", "srun", "--time", "2", "--signal", "USR1@75",
                 "--config", "configs/tiny.yaml",
                 *overrides(corpus_dir, out, f"train.steps={steps}", *schedule))
    wait_requeued(slurm_one_node, job, out, timeout=200)
    first = job_log(out, job)
    assert "SIGUSR1 received" in first, first[-3000:]
    stopped = json.loads((out / "requeue.json").read_text())["step"]
    assert 0 < stopped < steps
    # The uninterrupted run through the checkpoint and 500 steps past it: one process, on the core
    # the requeued job (one process) leaves free, while that job finishes.
    ref_out, ref_steps = tmp_path / "reference", stopped + 500
    uninterrupted = start(["megatron_lite.cli", "train", "--config", "configs/tiny.yaml",
                           *overrides(corpus_dir, ref_out, f"train.steps={ref_steps}", *schedule)],
                          tmp_path / "reference.log")
    try:
        release(slurm_one_node, job, out, "TimeLimit=10")
        assert slurm_one_node.wait(job, timeout=400) == "COMPLETED", job_log(out, job)[-3000:]
    finally:
        code, log = finish(uninterrupted, tmp_path / "reference.log", timeout=400)
    text = job_log(out, job)
    assert "(restart 1)" in text and f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'}" in text
    got = json_losses_every(out, 50)
    assert max(got) == steps and len(got) == steps // 50
    assert code == 0, log[-3000:]
    ref = json_losses_every(ref_out, 50)
    assert {s: got[s] for s in ref} == ref


def json_losses_every(out: Path, interval: int) -> dict[int, float]:
    from megatron_lite.train.metrics import read_metrics
    got = read_metrics(out, "train/loss")
    return {s: v for s, v in got.items() if s % interval == 0}


def test_verify_inside_a_slurm_allocation(slurm_one_node, tmp_path):
    """`srun -n 2 megatron-lite verify`: one task per rank, the run environment read from SLURM_*;
    the table covers every 2-rank layout and they all pass."""
    out = tmp_path / "verify.json"
    script = ("#!/bin/bash\n"
              f"cd {ROOT}\n"
              f"srun {sys.executable} -m megatron_lite.cli verify --steps 2 --json {out}\n")
    job = slurm_one_node.sbatch(script, workdir=tmp_path, ntasks=2, output=str(tmp_path / "verify.out"))
    state = slurm_one_node.wait(job, timeout=300)
    text = (tmp_path / "verify.out").read_text()
    assert state == "COMPLETED", text[-3000:]
    table = json.loads(out.read_text())
    assert table["world_size"] == 2 and table["passed"] and len(table["layouts"]) == 14
    assert all(row["passed"] for row in table["layouts"]) and "FAIL" not in text


def test_two_node_sbatch_job_completes(slurm_two_nodes, corpus_dir, tmp_path):
    out = tmp_path / "run"
    env_ifname = slurm_two_nodes.ifname
    slurm_two_nodes.env["GLOO_SOCKET_IFNAME"] = env_ifname
    job = submit(slurm_two_nodes, "--nodes", "2", "--config", "configs/tiny.yaml",
                 *overrides(corpus_dir, out, "train.steps=30", "parallel.dp=2"))
    state = slurm_two_nodes.wait(job, timeout=240)
    text = job_log(out, job)
    assert state == "COMPLETED", text[-3000:]
    assert "stopping at step 30: reached train.steps=30" in text
    assert len(losses(out)) == 30


@pytest.mark.parametrize("layout,rendezvous", [("tp", "c10d"), ("pp", "static")])
def test_multi_node_torchrun_across_namespaces_equals_one_node(slurm_two_nodes, corpus_dir, tmp_path,
                                                               layout, rendezvous):
    """2 nodes x 2 ranks (tp2 x dp2 with c10d, pp2 x dp2 with a static master) in two network
    namespaces; the losses equal the same layout on one node."""
    par = ["parallel.tp=2", "parallel.dp=2"] if layout == "tp" else ["parallel.pp=2", "parallel.dp=2"]
    steps = 20
    out = tmp_path / "multi"
    ovr = overrides(corpus_dir, out, f"train.steps={steps}", *par)
    head = slurm_two_nodes.addrs[0]
    procs = []
    for node_rank, (node, addr) in enumerate(zip(slurm_two_nodes.nodes, slurm_two_nodes.addrs, strict=True)):
        if rendezvous == "c10d":
            how = ["--rdzv-endpoint", f"{head}:29461", "--rdzv-id", f"t-{layout}"]
        else:
            how = ["--master-addr", head, "--master-port", "29462", "--node-rank", str(node_rank)]
        argv = torchrun_argv(*ovr, launcher=["--nnodes", "2", *how, "--local-addr", addr])
        procs.append(start(argv, tmp_path / f"{node}.log", prefix=slurm_two_nodes.netns_cmd(node),
                           GLOO_SOCKET_IFNAME=slurm_two_nodes.ifname))
    for p, node in zip(procs, slurm_two_nodes.nodes, strict=True):
        code, text = finish(p, tmp_path / f"{node}.log", timeout=300)
        assert code == 0, text[-3000:]
    single = tmp_path / "single"
    code, text = run(torchrun_argv(*overrides(corpus_dir, single, f"train.steps={steps}", *par)),
                     tmp_path / "single.log")
    assert code == 0, text[-3000:]
    assert losses(out) == losses(single)


def _elastic_node(cluster, tmp_path, ovr, i: int, rdzv: str):
    """One node's `launch torchrun --nnodes 1:2` (2 ranks) in its namespace; c10d rendezvous on node 1,
    which waits 3 s for more nodes once one has joined."""
    argv = torchrun_argv(*ovr, launcher=["--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-endpoint",
                                         f"{cluster.addrs[0]}:{rdzv}", "--rdzv-id", f"elastic-{rdzv}",
                                         "--local-addr", cluster.addrs[i],
                                         "--rdzv-conf", "last_call_timeout=3"])
    node = cluster.nodes[i]
    return start(argv, tmp_path / f"{node}-{rdzv}.log", prefix=cluster.netns_cmd(node),
                 GLOO_SOCKET_IFNAME=cluster.ifname)


def _same_math(out: Path, reference: dict, steps: int) -> None:
    """Every step's loss equals the uninterrupted dp4 run's within 1e-6 relative (fp32: only the order
    of the sums differs), and every step consumed exactly its global batch of 16 samples."""
    got = losses(out)
    assert len(got) == steps
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, reference.values(), strict=True))
    assert worst < 1e-6, worst
    samples = read_metrics(out, "train/samples")
    assert samples == {s: 16 * s for s in range(1, steps + 1)}, samples  # none skipped, none repeated


def test_elastic_torchrun_survives_a_node_death_and_takes_a_joining_node(slurm_two_nodes, corpus_dir,
                                                                         tmp_path):
    """parallel.dp=auto and a global batch of 16 (micro-batch 4): dp4 over two namespace nodes loses
    one node (every process of it killed) after step 12 and goes on at dp2 from the step-10
    checkpoint; a dp2 run on one node takes a second node after step 5 and goes on at dp4. Both
    equal an uninterrupted dp4 run."""
    c, steps = slurm_two_nodes, 30
    extra = [f"train.steps={steps}", "data.global_batch_size=16", "checkpoint.interval=5"]
    ref_out = tmp_path / "reference"
    argv = torchrun_argv(*overrides(corpus_dir, ref_out, *extra), launcher=["--nproc-per-node", "4"])
    code, text = run(argv, tmp_path / "reference.log")
    assert code == 0, text[-3000:]
    reference = read_metrics(ref_out, "train/loss")

    # A node dies: its launcher and workers SIGKILLed at once.
    out = tmp_path / "death"
    ovr = overrides(corpus_dir, out, *extra)
    a, b = (_elastic_node(c, tmp_path, ovr, i, "29481") for i in (0, 1))
    wait_step(out, 12, a, timeout=240)
    kill_node(b.pid)
    code, text = finish(a, tmp_path / f"{c.nodes[0]}-29481.log", timeout=300)
    b.wait()
    assert code == 0, text[-3000:]
    assert "Worker group FAILED" in text and "will restart worker group" in text  # the agent's account
    assert re.search(r"membership change: world 4 -> 2 \(dp=4 -> dp=2\); resumed at step 10, \d+ steps lost",
                     text)
    _same_math(out, reference, steps)
    (resume,) = [json.loads(line) for line in (out / "metrics.jsonl").open() if "resume/world" in line]
    assert (resume["step"], resume["resume/world_before"], resume["resume/world"]) == (10, 4, 2)
    assert resume["resume/steps_lost"] >= 2

    # A node joins: the running workers are paused at step 5 until the agent has seen the newcomer
    # (else this tiny run could end first); its SIGTERM then stops them with a checkpoint.
    out = tmp_path / "join"
    ovr = overrides(corpus_dir, out, *extra)
    a = _elastic_node(c, tmp_path, ovr, 0, "29482")
    wait_step(out, 5, a, timeout=240)
    workers = descendants(a.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    b = _elastic_node(c, tmp_path, ovr, 1, "29482")
    log_a = tmp_path / f"{c.nodes[0]}-29482.log"
    try:
        deadline = time.monotonic() + 120
        while "Detected 1 new nodes" not in log_a.read_text():
            assert time.monotonic() < deadline and b.poll() is None, log_a.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    code_b, text_b = finish(b, tmp_path / f"{c.nodes[1]}-29482.log", timeout=300)
    code, text = finish(a, log_a, timeout=300)
    assert code == 0 and code_b == 0, text[-2000:] + text_b[-2000:]
    # The pause may come a step after step 5 was logged: the stop is at whichever step was running.
    stopped = re.search(r"stopping at step (\d+): SIGTERM", text)
    assert stopped, text[-3000:]
    assert (f"membership change: world 2 -> 4 (dp=2 -> dp=4); resumed at step {stopped[1]}, 0 steps lost"
            in text), text[-3000:]
    _same_math(out, reference, steps)


def test_elastic_sbatch_job_requeued_onto_fewer_nodes_resumes(slurm_two_nodes, corpus_dir, tmp_path):
    """`launch slurm --nodes 1-2`: the job runs on both nodes (dp4); node 2 is drained and the job
    preempted (USR1): it checkpoints, requeues, comes back on node 1 alone at dp2 and completes with
    the losses of an uninterrupted dp4 run (1e-6 relative). This cluster's scheduler (cons_tres)
    grants a range's minimum when that fits, so the test holds the job at submission and raises its
    node count to 2 for the first start (as a user may update a pending job), and gives the range
    back when it releases the requeued job."""
    c, steps = slurm_two_nodes, 400
    c.env["GLOO_SOCKET_IFNAME"] = c.ifname
    out = tmp_path / "run"
    extra = [f"train.steps={steps}", "data.global_batch_size=16"]
    job = submit(c, "--nodes", "1-2", "--nproc-per-node", "2", "--sbatch-arg=--hold", "--config",
                 "configs/tiny.yaml", *overrides(corpus_dir, out, *extra))
    c.run("scontrol", "update", f"JobId={job}", "NumNodes=2")
    c.run("scontrol", "release", job)
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics(out, "train/loss")) < 20:
            assert time.monotonic() < deadline and c.job(job).get("JobState") in ("PENDING", "RUNNING"), \
                job_log(out, job)[-3000:]
            time.sleep(0.1)
        assert c.job(job)["NumNodes"] == "2", c.job(job)
        c.run("scontrol", "update", f"NodeName={c.nodes[1]}", "State=DRAIN", "Reason=elastic-test")
        c.run("scancel", "--signal=USR1", job)
        wait_requeued(c, job, out)
        release(c, job, out, "NumNodes=1-2", "NumTasks=1")
        assert c.wait(job, timeout=300) == "COMPLETED", f"{c.job(job)}\n{job_log(out, job)[-3000:]}"
        assert c.job(job)["NumNodes"] == "1"
    finally:
        c.run("scontrol", "update", f"NodeName={c.nodes[1]}", "State=RESUME", check=False)
    text = job_log(out, job)
    assert "(restart 1)" in text
    assert re.search(r"membership change: world 4 -> 2 \(dp=4 -> dp=2\); resumed at step \d+, 0 steps lost",
                     text), text[-3000:]
    ref_out = tmp_path / "reference"
    argv = torchrun_argv(*overrides(corpus_dir, ref_out, *extra), launcher=["--nproc-per-node", "4"])
    code, log = run(argv, tmp_path / "reference.log")
    assert code == 0, log[-3000:]
    _same_math(out, read_metrics(ref_out, "train/loss"), steps)
