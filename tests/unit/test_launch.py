"""The launchers' arguments and scripts, the stop requests and the launch config (no processes)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from types import SimpleNamespace

import pytest

from megatron_lite.config import Config, ConfigError
from megatron_lite.distributed.env import RunEnv
from megatron_lite.distributed.stop import ORPHANED, StopRequests
from megatron_lite.errors import LaunchError
from megatron_lite.launcher import add_parsers, sbatch_script, size_job, torchrun_argv, torchrun_env
from megatron_lite.testing import tiny_overrides


def _parse(*argv: str):
    p = argparse.ArgumentParser()
    add_parsers(p.add_subparsers(dest="command"))
    return p.parse_args(["launch", *argv])


@pytest.fixture
def ovr(corpus_dir, tmp_path):
    return tiny_overrides(corpus_dir, f"train.out_dir={tmp_path / 'run'}")


def test_process_count_comes_from_the_layout_and_node_count(ovr):
    p = size_job("configs/tiny.yaml", [*ovr, "parallel.tp=2", "parallel.dp=2"], nnodes=2, nproc_per_node=None)
    assert (p.world_size, p.nnodes, p.nproc_per_node) == (4, 2, 2)
    with pytest.raises(LaunchError, match=r"4 processes do not split evenly over 3 nodes"):
        size_job("configs/tiny.yaml", [*ovr, "parallel.tp=2", "parallel.dp=2"], nnodes=3, nproc_per_node=None)
    with pytest.raises(LaunchError, match=r"2 nodes x 1 processes per node = 2, but .* = 4"):
        size_job("configs/tiny.yaml", [*ovr, "parallel.tp=2", "parallel.dp=2"], nnodes=2, nproc_per_node=1)
    # Everything a worker would refuse is refused here, once: the layout, the data directory.
    with pytest.raises(ConfigError, match="num_attention_heads"):
        size_job("configs/tiny.yaml", [*ovr, "parallel.tp=3"], nnodes=1, nproc_per_node=None)
    with pytest.raises(Exception, match="data.dir"):
        size_job("configs/tiny.yaml", [*ovr, "data.dir=/nonexistent/x"], nnodes=1, nproc_per_node=None)


def test_torchrun_arguments_single_node_c10d_and_static(ovr):
    p = size_job("configs/tiny.yaml", [*ovr, "parallel.dp=2"], nnodes=1, nproc_per_node=None)
    argv = torchrun_argv(_parse("torchrun", "--config", "configs/tiny.yaml", *ovr, "parallel.dp=2"), p)
    assert argv[:7] == ["--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "0", "--standalone"]
    assert argv[7:12] == ["-m", "megatron_lite.cli", "train", "--config", "configs/tiny.yaml"]
    assert argv[-1] == "parallel.dp=2"
    p2 = size_job("configs/tiny.yaml", [*ovr, "parallel.dp=4"], nnodes=2, nproc_per_node=None)
    c10d = torchrun_argv(_parse("torchrun", "--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id",
                                "job7", "--local-addr", "10.0.0.2", "--config", "c.yaml"), p2)
    assert c10d[6:14] == ["--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "job7",
                          "--local-addr", "10.0.0.2"]
    host = torchrun_argv(_parse("torchrun", "--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29400",
                                "--local-addr", "10.0.0.1", "--config", "c.yaml"), p2)
    assert host[12:16] == ["--local-addr", "10.0.0.1", "--rdzv-conf", "is_host=true"]  # it hosts the store
    static = torchrun_argv(_parse("torchrun", "--nnodes", "2", "--master-addr", "10.0.0.1", "--node-rank",
                                  "1", "--config", "c.yaml"), p2)
    assert static[6:12] == ["--master-addr", "10.0.0.1", "--master-port", "29500", "--node-rank", "1"]
    with pytest.raises(LaunchError, match="needs a rendezvous"):
        torchrun_argv(_parse("torchrun", "--nnodes", "2", "--config", "c.yaml"), p2)
    with pytest.raises(LaunchError, match="needs --node-rank"):
        torchrun_argv(_parse("torchrun", "--nnodes", "2", "--master-addr", "h", "--config", "c.yaml"), p2)


def test_an_elastic_job_is_checked_at_every_node_count(ovr):
    elastic = [*ovr, "data.global_batch_size=16"]  # micro-batch 4: 2 per step at dp 2, 1 at dp 4
    p = size_job("configs/tiny.yaml", elastic, "1:2", 2)
    assert (p.nnodes, p.max_nnodes, p.nproc_per_node, p.world_size, p.elastic) == (1, 2, 2, 2, True)
    argv = torchrun_argv(_parse("torchrun", "--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-endpoint",
                                "10.0.0.1:29400", "--local-addr", "10.0.0.1", "--rdzv-conf",
                                "last_call_timeout=5", "--config", "c.yaml"), p)
    assert argv[:6] == ["--nnodes", "1:2", "--nproc-per-node", "2", "--max-restarts", "3"]  # a death restarts
    assert argv[argv.index("--rdzv-conf") + 1] == "last_call_timeout=5,is_host=true"
    with pytest.raises(LaunchError, match="needs the c10d rendezvous"):
        torchrun_argv(_parse("torchrun", "--nnodes", "1:2", "--master-addr", "h", "--node-rank", "0",
                             "--config", "c.yaml"), p)
    assert torchrun_env(p.config, 60, elastic=True)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in torchrun_env(p.config, 60)
    with pytest.raises(LaunchError, match=r"parallel.dp=2 fixes it; set parallel.dp=auto"):
        size_job("configs/tiny.yaml", [*elastic, "parallel.dp=2"], "1:2", 2)
    with pytest.raises(LaunchError, match="set data.global_batch_size"):
        size_job("configs/tiny.yaml", ovr, "1:2", 2)
    # A size that cannot keep the global batch is refused before any worker starts, naming it.
    with pytest.raises(ConfigError, match=r"at 3 nodes \(6 processes\): data.global_batch_size=16 is not a "
                                          r"multiple of data.micro_batch_size=4 x parallel.dp=6"):
        size_job("configs/tiny.yaml", elastic, "1:3", 2)
    with pytest.raises(LaunchError, match="must be a node count"):
        size_job("configs/tiny.yaml", elastic, "a:b", 2)
    with pytest.raises(LaunchError, match="MIN <= MAX"):
        size_job("configs/tiny.yaml", elastic, "2:1", 2)
    # dp=auto without --nproc-per-node: one data-parallel replica over the nodes.
    assert size_job("configs/tiny.yaml", [*ovr, "parallel.tp=2"], 1, None).world_size == 2
    # SLURM: a node range; torchrun inside runs on the count granted.
    args = _parse("slurm", "--nodes", "1-2", "--nproc-per-node", "2", "--config", "configs/tiny.yaml",
                  *elastic)
    script = sbatch_script(args, size_job(args.config, args.overrides, args.nodes, args.nproc_per_node))
    assert "#SBATCH --nodes=1-2  # any count SLURM grants" in script
    assert 'launch torchrun --nnodes "$SLURM_NNODES" --nproc-per-node 2' in script


def test_the_agent_forwards_every_stop_signal_and_waits_the_grace(ovr):
    cfg = Config.from_yaml("configs/tiny.yaml", [*ovr, "launch.stop_signals=[SIGTERM, SIGUSR2]"])
    env = torchrun_env(cfg, grace_s=90)
    assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
    assert env["PET_SIGNALS_TO_HANDLE"] == env["TORCHELASTIC_SIGNALS_TO_HANDLE"]
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"


def _slurm(ovr, *extra: str) -> str:
    args = _parse("slurm", "--nodes", "2", "--time", "0:30:00", "--config", "configs/tiny.yaml", *extra, *ovr,
                  "parallel.dp=4")
    return sbatch_script(args, size_job(args.config, args.overrides, args.nodes, args.nproc_per_node))


def test_sbatch_script_requeues_on_the_stop_status(ovr, tmp_path):
    script = _slurm(ovr)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --time=0:30:00", "#SBATCH --signal=USR1@120"):
        assert line in script, line
    assert f"#SBATCH --output={(tmp_path / 'run').resolve()}/slurm-%j.out" in script
    assert "launch torchrun --nnodes \"$SLURM_NNODES\" --nproc-per-node 2" in script
    assert 'if [ "$rc" -eq 75 ]; then' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    per_rank = _slurm(ovr, "--mode", "srun", "--signal", "TERM@60")
    assert "#SBATCH --ntasks-per-node=2  # one task per rank" in per_rank
    assert "-m megatron_lite.cli train --config configs/tiny.yaml" in per_rank
    assert "#SBATCH --signal=TERM@60" in per_rank
    with pytest.raises(LaunchError, match="no B: prefix"):
        _slurm(ovr, "--signal", "B:USR1@60")
    with pytest.raises(LaunchError, match="does not stop on USR2"):
        _slurm(ovr, "--signal", "USR2@60")


def test_launch_config_is_checked():
    with pytest.raises(ConfigError, match="launch.stop_signals entry 'SIGKILL'"):
        Config.from_yaml(None, ["launch.stop_signals=[SIGKILL]"])
    with pytest.raises(ConfigError, match="launch.requeue_exit_code=0"):
        Config.from_yaml(None, ["launch.requeue_exit_code=0"])
    with pytest.raises(ConfigError, match="launch.collective_timeout_s=0"):
        Config.from_yaml(None, ["launch.collective_timeout_s=0"])


def _trainer(world=1, rank=0):
    import torch
    return SimpleNamespace(env=RunEnv(rank=rank, world_size=world), device=torch.device("cpu"))


def test_a_signal_only_sets_a_flag_and_a_second_ctrl_c_stops_at_once():
    stops = StopRequests(["SIGUSR1", "SIGINT"], watch_parent=False).install()
    try:
        assert stops.hook(_trainer()) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.hook(_trainer()) == "SIGUSR1 received" == stops.stopped_by
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    stops = StopRequests(["SIGINT"], watch_parent=False).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a checkpoint at the next step
        assert stops.hook(_trainer()) == "SIGINT received"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: now
    finally:
        stops.uninstall()


def test_a_dead_parent_becomes_a_stop_request():
    stops = StopRequests([], poll_s=0.01)
    stops._parent = -1  # as if the parent pid had changed since we started
    stops._watch()
    assert stops.local == ORPHANED


def test_a_resume_records_the_membership_change_and_the_steps_lost(tmp_path):
    from megatron_lite.layout import Layout
    from megatron_lite.train.trainer import Resume
    lines = [f'{{"step": {s}, "train/loss": 1.0}}\n' for s in range(1, 14)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    layout = Layout.build(Config.from_yaml(None, []), 2)
    written = {**Layout.build(Config.from_yaml(None, []), 4).as_dict()}
    r = Resume.of(written, layout, 10, tmp_path)
    assert (r.world_before, r.world, r.steps_lost) == (4, 2, 3)  # steps 11-13 ran after the checkpoint
    row = r.record()
    assert row["resume/world_before"] == 4 and row["resume/steps_lost"] == 3
    assert 0 <= row["resume/seconds"] < 60
    assert r.describe().startswith("membership change: world 4 -> 2 (dp=4 -> dp=2); resumed at step 10, "
                                   "3 steps lost, first step")
    same = Resume.of(layout.as_dict(), layout, 13, tmp_path)
    assert same.steps_lost == 0 and same.describe().startswith("resume at world 2;")
