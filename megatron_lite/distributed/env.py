"""The run environment: who this process is in the job, read from the launcher in one place.

    env = RunEnv.from_environ()        # single process, torchrun, or SLURM tasks without torchrun
    env = RunEnv(rank=1, world_size=2, init_method="file:///tmp/store")   # tests build their own

The trainer is handed a RunEnv and never reads os.environ itself, so a test (or a launcher) states
the environment instead of patching it. The few other reads (the launcher's world size at exit, the
SLURM node name, the copy a child process is given) and every write (`export`: what DeepSpeed, HF
datasets and the torchrun agent read from the environment; listed in docs/architecture.md) are the
functions at the end of this module.

Sources, in order:
  torchrun   RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT; the process
             group joins torchrun's own rendezvous store (env://).
  SLURM      one task per rank (srun without torchrun): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
             SLURM_NTASKS_PER_NODE / SLURM_NNODES, SLURM_NODEID; the master is MASTER_ADDR or the first
             host of SLURM_JOB_NODELIST, the port MASTER_PORT or one derived from the job id.
  single     anything else: rank 0 of 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from ..errors import LaunchError


@dataclass(frozen=True)
class RunEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    init_method: str | None = None  # None: tcp://master_addr:master_port
    source: str = "single"  # single | torchrun | slurm | explicit
    # torchrun: how many times the agent restarted the workers, and whether they share its store
    # (which then still holds the keys of the previous attempt).
    restart_count: int = 0
    agent_store: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"rank {self.rank} is outside a world of {self.world_size} processes; check "
                              f"the launcher's RANK / WORLD_SIZE (or SLURM_PROCID / SLURM_NTASKS).")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise LaunchError(f"local rank {self.local_rank} is outside {self.local_world_size} processes "
                              f"per node; check LOCAL_RANK / LOCAL_WORLD_SIZE (or SLURM_LOCALID).")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def url(self) -> str:
        """Where the processes meet to form the default process group."""
        return self.init_method or f"tcp://{self.master_addr}:{self.master_port}"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "RunEnv":
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or a user exporting its variables)
            world = _int(env, "WORLD_SIZE")
            local_world = _int(env, "LOCAL_WORLD_SIZE", world)
            return cls(rank=_int(env, "RANK"), world_size=world, local_rank=_int(env, "LOCAL_RANK", 0),
                       local_world_size=local_world, num_nodes=max(1, world // max(local_world, 1)),
                       node_rank=_int(env, "GROUP_RANK", 0), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=_int(env, "MASTER_PORT", 29500),
                       init_method="env://" if "MASTER_ADDR" in env else None, source="torchrun",
                       restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
                       agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            world = _int(env, "SLURM_NTASKS")
            nodes = _int(env, "SLURM_NNODES", 1)
            per_node = _first_int(env.get("SLURM_NTASKS_PER_NODE")) or max(1, world // nodes)
            master = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
            port = _int(env, "MASTER_PORT", 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000)
            return cls(rank=_int(env, "SLURM_PROCID"), world_size=world,
                       local_rank=_int(env, "SLURM_LOCALID", 0),
                       local_world_size=per_node, num_nodes=nodes, node_rank=_int(env, "SLURM_NODEID", 0),
                       master_addr=master, master_port=port, source="slurm")
        return cls()


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise LaunchError(f"the launcher did not set {key}; start the job with torchrun or srun.")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{key}={value!r} is not an integer; check the launcher's environment.") from None


def _first_int(value: str | None) -> int | None:
    """SLURM_NTASKS_PER_NODE looks like '4' or '4(x2)'."""
    m = re.match(r"\d+", value or "")
    return int(m.group()) if m else None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'node[03-05,07],gpu1' -> 'node03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list; set MASTER_ADDR explicitly.")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


# ---- the rest of the process environment: the package's other reads and its only writes ----------
def launched_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The world size a launcher announced (torchrun's WORLD_SIZE, srun's SLURM_NTASKS), else 1.
    Never raises: the console script reads it on its way out, after any error."""
    env = os.environ if environ is None else environ
    value = env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or "1"
    return int(value) if value.isdigit() else 1


def slurm_node_name() -> str:
    """This node's name inside a SLURM job ('' outside one)."""
    return os.environ.get("SLURMD_NODENAME", "")


def child_environ(**extra: str) -> dict[str, str]:
    """A copy of this process's environment with `extra` on top, for a process started from this one."""
    return {**os.environ, **extra}


def export(values: Mapping[str, str], overwrite: bool = True) -> None:
    """Write `values` into this process's environment, for libraries that read it themselves (and the
    processes they start); with overwrite=False a variable the user set wins."""
    for key, value in values.items():
        if overwrite:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process now (from /proc: Linux; no name matching). Processes
    that end while being read are left out."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents
