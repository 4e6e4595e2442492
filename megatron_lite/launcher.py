"""Launchers: torchrun on one or many nodes, and SLURM batch scripts that requeue on preemption.

    megatron-lite launch torchrun --config C [--nnodes N|MIN:MAX --rdzv-endpoint HOST:PORT | --master-addr A
                                  --node-rank R] [--max-restarts K] [overrides]
    megatron-lite launch slurm --nodes N|MIN-MAX --config C [--time 2:00:00 --signal USR1@120] [--submit]

Both check the config once, before any worker starts (the layout against the process count, the
data directory, a checkpoint to resume): a mistake is one sentence and exit status 2, not one
sentence per rank followed by the launcher's traceback.

The process count is the layout's (parallel.tp x cp x pp x dp), split evenly over the nodes; with
parallel.dp=auto it is --nproc-per-node x the nodes, and dp follows from it.

Elastic jobs (parallel.dp=auto, data.global_batch_size set). `--nnodes MIN:MAX` runs torchrun's
elastic c10d rendezvous: when a node dies, the survivors' collectives fail, their agent restarts them
(one of --max-restarts) and the new, smaller group resumes from the newest checkpoint; when a node
joins, every agent stops its workers with SIGTERM, which is a stop request (a checkpoint at the next
step boundary, nothing lost) and the larger group resumes from it. Every size keeps the global batch:
micro-batches per step = global / (micro-batch x dp), so the optimizer sees the same batches. The
trainer logs each change of world (train/trainer.py). `launch slurm --nodes MIN-MAX` asks SLURM for
any count in the range; a requeued job that comes back on another count resumes the same way.

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
from .errors import LaunchError, UserError

log = logging.getLogger(__name__)

# torchrun forwards only these to its workers unless told otherwise; SLURM preempts with USR1/TERM.
TORCHRUN_DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass
class Job:
    """How many processes, where: the layout's world split over nodes (a range of node counts for an
    elastic job: its world is that of the fewest, and grows by nproc_per_node per node)."""
    config: Config
    world_size: int
    nnodes: int
    nproc_per_node: int
    max_nnodes: int | None = None  # elastic: the most nodes (torchrun --nnodes MIN:MAX)

    @property
    def elastic(self) -> bool:
        return self.max_nnodes is not None and self.max_nnodes != self.nnodes

    @property
    def nnodes_arg(self) -> str:
        return f"{self.nnodes}:{self.max_nnodes}" if self.elastic else str(self.nnodes)


def parse_nnodes(value: str | int) -> tuple[int, int]:
    """--nnodes N or MIN:MAX (torchrun's spelling; SLURM's MIN-MAX is read too)."""
    text = str(value).replace("-", ":")
    try:
        lo, _, hi = text.partition(":")
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise LaunchError(f"--nnodes={value!r} must be a node count (2) or a range MIN:MAX (1:2).") from None
    if not 1 <= low <= high:
        raise LaunchError(f"--nnodes={value!r} must be >= 1 (and MIN <= MAX in MIN:MAX).")
    return low, high


def size_job(config_path: str, overrides: list[str], nnodes: int | str, nproc_per_node: int | None) -> Job:
    """Load and check the config (everything a worker would refuse) for nnodes nodes, or for every
    node count of an elastic range MIN:MAX."""
    from .train.trainer import preflight
    cfg = Config.from_yaml(config_path, overrides)
    p = cfg.parallel
    low, high = parse_nnodes(nnodes)
    replica = p.tp * p.cp * p.pp
    said = f"parallel.tp={p.tp} x cp={p.cp} x pp={p.pp} x dp={p.dp}"
    if p.dp != "auto" and low != high:
        raise LaunchError(f"--nnodes={low}:{high} lets the process count change, but parallel.dp={p.dp} "
                          f"fixes it; set parallel.dp=auto (data-parallel size from the processes) and "
                          f"data.global_batch_size (the batch every size keeps).")
    if low != high and cfg.data.global_batch_size is None:
        raise LaunchError(f"--nnodes={low}:{high}: an elastic job keeps the math only with a fixed global "
                          f"batch; set data.global_batch_size (micro-batches per step then follow dp).")
    if nproc_per_node is None:
        world = replica * (1 if p.dp == "auto" else p.dp)
        if world % low:
            raise LaunchError(f"{said} = {world} processes do not split evenly over {low} nodes; change the "
                              f"node count, parallel.dp, or give --nproc-per-node.")
        nproc_per_node = world // low
    if p.dp != "auto" and nproc_per_node * low != replica * p.dp:
        raise LaunchError(f"{low} nodes x {nproc_per_node} processes per node = {nproc_per_node * low}, "
                          f"but {said} = {replica * p.dp}; make them equal (or leave --nproc-per-node out to "
                          f"derive it, or set parallel.dp=auto).")
    for n in range(low, high + 1):  # every size the job may run at refuses now, not at that restart
        try:
            preflight(cfg, n * nproc_per_node, check_lock=low == high)
        except UserError as e:
            if low == high:
                raise
            raise type(e)(f"at {n} nodes ({n * nproc_per_node} processes): {e}") from None
    return Job(cfg, low * nproc_per_node, low, nproc_per_node, high)


# ---- torchrun -------------------------------------------------------------------------------------
def torchrun_argv(args, p: Job) -> list[str]:
    """torch.distributed.run's arguments for this job (the worker is `python -m megatron_lite.cli`)."""
    restarts = args.max_restarts if args.max_restarts is not None else 3 if p.elastic else 0
    argv = ["--nnodes", p.nnodes_arg, "--nproc-per-node", str(p.nproc_per_node),
            "--max-restarts", str(restarts)]
    if p.elastic and not args.rdzv_endpoint:
        raise LaunchError(f"--nnodes={p.nnodes_arg} (elastic) needs the c10d rendezvous: --rdzv-endpoint "
                          f"HOST:PORT, the same on every node (the static --master-addr has fixed members).")
    if p.nnodes == 1 and not p.elastic and not (args.rdzv_endpoint or args.master_addr):
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
    conf = [args.rdzv_conf] if args.rdzv_conf else []
    if args.local_addr:
        argv += ["--local-addr", args.local_addr]
        if args.rdzv_endpoint and args.rdzv_endpoint.rsplit(":", 1)[0] == args.local_addr:
            # torchrun decides who hosts the c10d store by matching the endpoint against this
            # machine's hostname and its addresses; where the hostname resolves to loopback nobody
            # matches and every node waits as a client. The node whose address it is hosts it.
            conf.append("is_host=true")
    if conf:
        argv += ["--rdzv-conf", ",".join(conf)]
    return argv + ["-m", "megatron_lite.cli", "train", "--config", args.config, *args.overrides]


def torchrun_env(cfg: Config, grace_s: int, elastic: bool = False) -> dict[str, str]:
    """Make the agent forward our stop signals (SLURM's USR1 would otherwise kill it and orphan the
    workers) and wait grace_s for the workers' checkpoint before it kills them. Both the newer
    PET_* spellings and the older variables, so any torch >= 2.4 reads one of them.

    Elastic: the rendezvous store is not shared with the workers. With sharing (torch's default)
    the first round's rank-0 agent keeps its bootstrap address and does not publish it again, so a
    node joining a later round waits for MASTER_ADDR forever while rank 0 waits for the newcomer's
    role (measured with torch 2.13: both time out after 60 s). Unshared, every round's rank 0
    publishes a fresh address for that round's workers."""
    signals = ",".join(dict.fromkeys([*TORCHRUN_DEFAULT_SIGNALS, *cfg.launch.stop_signals]))
    env = {"PET_SIGNALS_TO_HANDLE": signals, "TORCHELASTIC_SIGNALS_TO_HANDLE": signals,
           "PET_SHUTDOWN_TIMEOUT": str(grace_s), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(grace_s)}
    if elastic:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def show_agent_log() -> None:
    """The torchrun agent's own account (rendezvous rounds, a failed worker group restarted, new
    nodes detected): what an elastic job's log must say about each membership change. torch logs
    it through its own handler, at WARNING unless told."""
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.INFO)


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
    show_agent_log()
    argv = torchrun_argv(args, p)
    export_env(torchrun_env(p.config, args.grace, p.elastic))  # read by the agent torchrun_main starts
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
             f"(layout {cfg.parallel.tp}x{cfg.parallel.cp}x{cfg.parallel.pp}x{cfg.parallel.dp} = "
             f"tp x cp x pp x dp).",
             f"#SBATCH --job-name={args.job_name or 'mlite-' + out_dir.name}",
             f"#SBATCH --nodes={p.nnodes_arg.replace(':', '-')}"
             + ("  # any count SLURM grants in this range: dp=auto follows it" if p.elastic else "")]
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
    t.add_argument("--nnodes", default="1",
                   help="node count, or MIN:MAX for an elastic job (parallel.dp=auto): nodes may leave or "
                        "join; the workers restart at the new size from the newest checkpoint")
    t.add_argument("--nproc-per-node", type=int, default=None,
                   help="default: parallel.tp x cp x pp x dp (dp=auto: 1) / --nnodes")
    t.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node)")
    t.add_argument("--rdzv-id", default="megatron-lite", help="job id shared by the nodes (c10d)")
    t.add_argument("--master-addr", default=None, help="static rendezvous: the master node's address")
    t.add_argument("--master-port", type=int, default=29500)
    t.add_argument("--node-rank", type=int, default=None, help="static rendezvous: this node's rank")
    t.add_argument("--local-addr", default=None,
                   help="this node's address for the rendezvous (when its hostname resolves to loopback); "
                        "'slurm': the node's NodeAddr")
    t.add_argument("--max-restarts", type=int, default=None,
                   help="restart the workers after a failure; they resume from the newest checkpoint "
                        "(default 0; elastic: 3)")
    t.add_argument("--rdzv-conf", default=None,
                   help="torchrun's rendezvous settings, e.g. last_call_timeout=5 (seconds an elastic "
                        "rendezvous waits for more nodes once MIN have joined; torch's default 30)")
    t.add_argument("--grace", type=int, default=120,
                   help="seconds the agent waits for the workers' checkpoint after a stop signal")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=cmd_torchrun)

    s = lsub.add_parser("slurm", help="print (or --submit) an sbatch script for this config")
    s.add_argument("--config", required=True)
    s.add_argument("--nodes", default="1",
                   help="node count, or MIN-MAX: the job starts on what SLURM grants (parallel.dp=auto), "
                        "and a requeued job may come back on another count and resumes")
    s.add_argument("--nproc-per-node", type=int, default=None,
                   help="default: parallel.tp x cp x pp x dp (dp=auto: 1) / --nodes")
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
