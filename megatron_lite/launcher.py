"""Launchers: torchrun on one or many nodes, and SLURM batch scripts that requeue on preemption.

    megatron-lite launch torchrun --config C [--nnodes N --rdzv-endpoint HOST:PORT | --master-addr A
                                  --node-rank R] [--max-restarts K] [overrides]
    megatron-lite launch slurm --nodes N --config C [--time 2:00:00 --signal USR1@120] [--submit]

Both check the config once, before any worker starts (the layout against the process count, the
data directory, a checkpoint to resume): a mistake is one sentence and exit status 2, not one
sentence per rank followed by the launcher's traceback.

The process count is the layout's (parallel.tp x pp x dp), split evenly over the nodes.

Preemption protocol. A stop signal (launch.stop_signals) reaching any worker stops every rank at the
same step with a checkpoint; rank 0 then writes train.out_dir/requeue.json, and the launcher exits
with launch.requeue_exit_code (75 by default). The SLURM script requeues its own job on that status,
and the requeued job resumes from the run directory. Under torchrun the workers themselves exit 0
(the agent would count anything else as a failure and restart them); this wrapper turns the marker
into the status.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .distributed.env import export as export_env
from .distributed.env import slurm_node_name
from .errors import LaunchError

log = logging.getLogger(__name__)

# torchrun forwards only these to its workers unless told otherwise; SLURM preempts with USR1/TERM.
TORCHRUN_DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass
class Job:
    """How many processes, where: the layout's world split over nodes."""
    config: Config
    world_size: int
    nnodes: int
    nproc_per_node: int


def size_job(config_path: str, overrides: list[str], nnodes: int, nproc_per_node: int | None) -> Job:
    """Load and check the config (everything a worker would refuse) for nnodes nodes."""
    from .train.trainer import preflight
    cfg = Config.from_yaml(config_path, overrides)
    p = cfg.parallel
    world = p.tp * p.pp * p.dp
    if nnodes < 1:
        raise LaunchError(f"--nnodes={nnodes} must be >= 1.")
    if nproc_per_node is None:
        if world % nnodes:
            raise LaunchError(f"parallel.tp={p.tp} x pp={p.pp} x dp={p.dp} = {world} processes do not split "
                              f"evenly over {nnodes} nodes; change the node count or parallel.dp.")
        nproc_per_node = world // nnodes
    if nproc_per_node * nnodes != world:
        raise LaunchError(f"{nnodes} nodes x {nproc_per_node} processes per node = "
                          f"{nproc_per_node * nnodes}, but parallel.tp={p.tp} x pp={p.pp} x dp={p.dp} = "
                          f"{world}; make them equal (or leave --nproc-per-node out to derive it).")
    preflight(cfg, world)
    return Job(cfg, world, nnodes, nproc_per_node)


# ---- torchrun -------------------------------------------------------------------------------------
def torchrun_argv(args, p: Job) -> list[str]:
    """torch.distributed.run's arguments for this job (the worker is `python -m megatron_lite.cli`)."""
    argv = ["--nnodes", str(p.nnodes), "--nproc-per-node", str(p.nproc_per_node),
            "--max-restarts", str(args.max_restarts)]
    if p.nnodes == 1 and not (args.rdzv_endpoint or args.master_addr):
        argv.append("--standalone")  # a local c10d store on a free port
    elif args.rdzv_endpoint:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
                 "--rdzv-id", args.rdzv_id]
    elif args.master_addr:
        if args.node_rank is None:
            raise LaunchError("--master-addr (a static rendezvous) needs --node-rank (0 on the master node).")
        argv += ["--master-addr", args.master_addr, "--master-port", str(args.master_port),
                 "--node-rank", str(args.node_rank)]
    else:
        raise LaunchError(f"--nnodes={p.nnodes} needs a rendezvous: --rdzv-endpoint HOST:PORT (c10d, the "
                          f"same on every node) or --master-addr HOST --node-rank R (static).")
    if args.local_addr == "slurm":  # this node's NodeAddr: its hostname may resolve to loopback
        args.local_addr = slurm_node_addr(slurm_node_name())
    if args.local_addr:
        argv += ["--local-addr", args.local_addr]
        if args.rdzv_endpoint and args.rdzv_endpoint.rsplit(":", 1)[0] == args.local_addr:
            # torchrun decides who hosts the c10d store by matching the endpoint against this
            # machine's hostname and its addresses; where the hostname resolves to loopback nobody
            # matches and every node waits as a client. The node whose address it is hosts it.
            argv += ["--rdzv-conf", "is_host=true"]
    return argv + ["-m", "megatron_lite.cli", "train", "--config", args.config, *args.overrides]


def torchrun_env(cfg: Config, grace_s: int) -> dict[str, str]:
    """Make the agent forward our stop signals (SLURM's USR1 would otherwise kill it and orphan the
    workers) and wait grace_s for the workers' checkpoint before it kills them. Both the newer
    PET_* spellings and the older variables, so any torch >= 2.4 reads one of them."""
    signals = ",".join(dict.fromkeys([*TORCHRUN_DEFAULT_SIGNALS, *cfg.launch.stop_signals]))
    return {"PET_SIGNALS_TO_HANDLE": signals, "TORCHELASTIC_SIGNALS_TO_HANDLE": signals,
            "PET_SHUTDOWN_TIMEOUT": str(grace_s), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(grace_s)}


def slurm_node_addr(node: str) -> str | None:
    """A SLURM node's address as the controller knows it (NodeAddr), or None."""
    import subprocess
    if not node:
        return None
    res = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True)
    for field in res.stdout.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return None


def cmd_torchrun(args) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from .distributed.stop import requeue_marker
    from .logs import setup_logging
    setup_logging()
    p = size_job(args.config, args.overrides, args.nnodes, args.nproc_per_node)
    argv = torchrun_argv(args, p)
    export_env(torchrun_env(p.config, args.grace))  # read by the agent torchrun_main starts in-process
    marker = requeue_marker(p.config.train.out_dir)
    if args.node_rank in (None, 0):
        marker.unlink(missing_ok=True)
    log.info(f"torchrun {shlex.join(argv)}")
    try:
        torchrun_main(argv)
        code = 0
    except SignalException as e:  # the agent was signalled; it forwarded the signal and waited
        code = 128 + int(e.sigval)
        log.info(f"torchrun stopped by {signal.Signals(e.sigval).name}")
    except ChildFailedError:  # torchrun has printed which worker failed and why
        code = 1
    if marker.is_file():
        code = p.config.launch.requeue_exit_code
        log.info(f"the run stopped with a checkpoint ({marker}): exit status {code} (requeue to resume)")
    return code


# ---- SLURM ----------------------------------------------------------------------------------------
def sbatch_script(args, p: Job) -> str:
    """A complete batch script: one srun task per node running this package's torchrun launcher
    (mode torchrun) or one task per rank (mode srun), requeued on preemption."""
    cfg = p.config
    out_dir = Path(cfg.train.out_dir).resolve()
    sig_name, at, sig_time = args.signal.partition("@")
    if sig_name.startswith("B:") or not at or not sig_time.isdigit():
        raise LaunchError(f"--signal={args.signal!r} must look like USR1@120 (signal @ seconds before the "
                          f"time limit, sent to the tasks: no B: prefix, the batch shell does not pass it "
                          f"on).")
    sig_name = sig_name.removeprefix("R:")
    if "SIG" + sig_name.removeprefix("SIG") not in cfg.launch.stop_signals:
        raise LaunchError(f"--signal={args.signal!r}: the run does not stop on {sig_name} "
                          f"(launch.stop_signals={cfg.launch.stop_signals}); add it there or pick one of "
                          f"those.")
    python = shlex.quote(args.python or sys.executable)
    train_args = shlex.join(["--config", args.config, *args.overrides])
    lines = ["#!/bin/bash",
             f"# Generated by `megatron-lite launch slurm` for {out_dir} "
             f"(layout {cfg.parallel.tp}x{cfg.parallel.pp}x{cfg.parallel.dp} = tp x pp x dp).",
             f"#SBATCH --job-name={args.job_name or 'mlite-' + out_dir.name}",
             f"#SBATCH --nodes={p.nnodes}"]
    if args.mode == "torchrun":
        lines += ["#SBATCH --ntasks-per-node=1  # one torchrun agent per node; it starts the ranks"]
    else:
        lines += [f"#SBATCH --ntasks-per-node={p.nproc_per_node}  # one task per rank"]
    if args.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    lines += [f"#SBATCH --output={out_dir}/slurm-%j.out",
              "#SBATCH --open-mode=append  # a requeued job appends to the same log",
              "#SBATCH --requeue",
              f"#SBATCH --signal={sig_name}@{sig_time}  # {sig_name} to every task {sig_time} s before the "
              f"time limit: checkpoint, then requeue"]
    if args.time:
        lines.append(f"#SBATCH --time={args.time}")
    for extra in args.sbatch_arg:
        lines.append(f"#SBATCH {extra}")
    lines += ["",
              "set -u",
              f"cd {shlex.quote(str(Path(args.workdir or os.getcwd()).resolve()))}",
              'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
              "# The rendezvous host: the first node of the allocation, by its address (node names need not",
              "# resolve on the compute nodes).",
              'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
              'head_addr=$(scontrol show node "$head" | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\')',
              'export MASTER_ADDR=${head_addr:-$head}',
              f"export MASTER_PORT={args.port}"]
    if args.mode == "torchrun":
        launch = (f"srun --kill-on-bad-exit=1 {python} -m megatron_lite.cli launch torchrun "
                  f"--nnodes \"$SLURM_NNODES\" --nproc-per-node {p.nproc_per_node} "
                  f"--rdzv-endpoint \"$MASTER_ADDR:$MASTER_PORT\" --rdzv-id \"$SLURM_JOB_ID\" "
                  f"--local-addr slurm "
                  f"--grace {args.grace} {train_args}")
    else:
        launch = f"srun --kill-on-bad-exit=1 {python} -m megatron_lite.cli train {train_args}"
    code = cfg.launch.requeue_exit_code
    lines += [launch,
              "rc=$?",
              f"if [ \"$rc\" -eq {code} ]; then",
              f"  # The run saved a checkpoint after a stop signal ({out_dir}/requeue.json): requeue this",
              "  # job; it resumes from the run directory. Slurm holds a requeued job for 120 s",
              "  # (BeginTime) before it is eligible again.",
              '  echo "stopped with a checkpoint: requeueing job $SLURM_JOB_ID"',
              '  scontrol requeue "$SLURM_JOB_ID"',
              "  exit 0",
              "fi",
              'exit "$rc"',
              ""]
    return "\n".join(lines)


def cmd_slurm(args) -> int:
    import subprocess
    p = size_job(args.config, args.overrides, args.nodes, args.nproc_per_node)
    script = sbatch_script(args, p)
    if not args.submit:
        print(script, end="")
        return 0
    os.makedirs(p.config.train.out_dir, exist_ok=True)
    path = Path(p.config.train.out_dir) / "job.sbatch"
    path.write_text(script)
    try:
        res = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError(f"sbatch is not installed here; submit {path} from a SLURM login node, or leave "
                          f"--submit out to print the script.") from None
    if res.returncode:
        raise LaunchError(f"sbatch {path} failed: {res.stderr.strip() or res.stdout.strip()}")
    print(res.stdout.strip().split(";")[0])
    return 0


def add_parsers(sub) -> None:
    """`megatron-lite launch torchrun|slurm`."""
    launch = sub.add_parser("launch", help="start a job: torchrun (one or many nodes) or a SLURM batch job")
    lsub = launch.add_subparsers(dest="launch_command", required=True)

    t = lsub.add_parser("torchrun", help="run torchrun for this config on this node (validates it first)")
    t.add_argument("--config", required=True)
    t.add_argument("--nnodes", type=int, default=1)
    t.add_argument("--nproc-per-node", type=int, default=None,
                   help="default: parallel.tp x pp x dp / --nnodes")
    t.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node)")
    t.add_argument("--rdzv-id", default="megatron-lite", help="job id shared by the nodes (c10d)")
    t.add_argument("--master-addr", default=None, help="static rendezvous: the master node's address")
    t.add_argument("--master-port", type=int, default=29500)
    t.add_argument("--node-rank", type=int, default=None, help="static rendezvous: this node's rank")
    t.add_argument("--local-addr", default=None,
                   help="this node's address for the rendezvous (when its hostname resolves to loopback); "
                        "'slurm': the node's NodeAddr")
    t.add_argument("--max-restarts", type=int, default=0,
                   help="restart the workers after a failure; they resume from the newest checkpoint")
    t.add_argument("--grace", type=int, default=120,
                   help="seconds the agent waits for the workers' checkpoint after a stop signal")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=cmd_torchrun)

    s = lsub.add_parser("slurm", help="print (or --submit) an sbatch script for this config")
    s.add_argument("--config", required=True)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--nproc-per-node", type=int, default=None,
                   help="default: parallel.tp x pp x dp / --nodes")
    s.add_argument("--mode", choices=["torchrun", "srun"], default="torchrun",
                   help="torchrun: one task per node starting torchrun; srun: one task per rank")
    s.add_argument("--time", default=None, help="time limit, e.g. 2:00:00")
    s.add_argument("--signal", default="USR1@120",
                   help="SIG@SECONDS before the time limit (pick SECONDS > a step + the measured save "
                        "time + a margin; SLURM sends it 0-30 s early)")
    s.add_argument("--grace", type=int, default=120,
                   help="seconds torchrun waits for the checkpoint after a signal")
    s.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    s.add_argument("--job-name", default=None)
    s.add_argument("--cpus-per-task", type=int, default=None)
    s.add_argument("--workdir", default=None, help="directory the job runs in (default: here)")
    s.add_argument("--python", default=None, help="the Python that runs the job (default: this one)")
    s.add_argument("--sbatch-arg", action="append", default=[],
                   help="an extra #SBATCH line, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    s.add_argument("--submit", action="store_true", help="write RUN/job.sbatch, submit it, print the job id")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=cmd_slurm)
