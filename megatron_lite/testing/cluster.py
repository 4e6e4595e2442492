"""Real local SLURM clusters (``launch/local-cluster.sh`` of the source checkout): bring one up or down
(:class:`ClusterManager`) and drive it (:class:`Cluster`). Only one cluster can be up at a time (they
share ports and the state directory); ``up`` is idempotent (a no-op when that cluster is already up,
down-then-up when the other one is), so an ``up`` of a healthy cluster is a health check. The pytest
fixtures are in tests/e2e/conftest.py.

Needs root (daemons, network namespaces) and slurm-wlm + munge (installed with apt by the script
when missing); :func:`skip_reason` says what is missing.

Slurm facts measured on this cluster (Debian bookworm's Slurm 22.05.8; re-checked by
tests/e2e/test_local_cluster.py), which the launchers rely on:

(a) Self-requeue. ``scontrol requeue $SLURM_JOB_ID`` from the running batch script returns 0, and
    the job is killed right after (SIGTERM to every process of the job, SIGKILL KillWait seconds
    later): without a TERM trap the script dies within milliseconds, so a following
    ``scontrol update JobId=$SLURM_JOB_ID StartTime=now`` normally never runs. With a trap it does
    run (and returns 0), but has no effect: the job is COMPLETING until the script is gone, and
    the requeue sets the eligibility only when it turns PENDING: Reason=BeginTime,
    EligibleTime = (new) SubmitTime + 121 s (not shortened by AuthInfo cred_expire). A job cannot
    un-delay itself; someone outside (root or the job's user) must run
    ``scontrol update JobId=N StartTime=now`` once the job is PENDING - it then runs again within
    ~1 s here (SLURM_RESTART_COUNT=1; with --open-mode=append the output file is kept).
(b) ``scancel --signal=USR1 JOBID`` (no -b/-f) signals the tasks of every step, not the batch
    shell (nor srun, which runs in the batch step). ``-b``: only the batch shell. ``-f/--full``:
    the batch shell and the tasks. Whether the tasks' CHILDREN get it depends on ProctrackType:
    proctrack/cgroup (the usual one on clusters; our one-node cluster) signals only the processes
    srun started (direct children of slurmstepd; "only signal slurm tasks unless signal is
    SIGKILL"), not their children, though they share the process group; proctrack/linuxproc (our
    two-node cluster) signals the whole process tree. So a task that is a launcher (torchrun, a
    shell) must forward the signal to its workers itself - and must not count on not getting it
    twice on clusters without cgroups.
(c) ``--signal=USR1@T`` goes to the tasks like (b) (``--signal=B:USR1@T``: the batch shell only).
    slurmctld checks time limits every 30 s (its clock, not the job's) and sends the signal at the
    first check that finds remaining time <= T + 30 s: so normally 0-30 s EARLIER than asked
    (``--time=2``: ``@70`` arrived 79 s before the end, ``@30`` 49 s before). With ``--time=1``
    (remaining time <= T + 30 from the start) it comes at the first check after the start: 0-30 s
    after it - measured 29.6 s for both ``@30`` and ``@50`` (so ``@50`` came 20 s LATE), and 7 s in
    another run. The TIMEOUT kill comes at the first check at/after the limit: 60-90 s (measured 60
    and 67 s). Ask for T >= 60 and expect up to 30 s of slack either way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed.env import child_environ
from . import ROOT

SCRIPT = ROOT / "launch" / "local-cluster.sh"
# The script's state directory (it reads LOCAL_CLUSTER_DIR itself; run_script passes ours on).
STATE_DIR = Path(child_environ().get("LOCAL_CLUSTER_DIR", "/tmp/megatron-lite-cluster"))
# Job states after which a job never runs again (no accounting: read with `scontrol show job`,
# which keeps a finished job for MinJobAge=120 s).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def skip_reason() -> str | None:
    """Why the local cluster cannot run here (None: it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "local SLURM cluster needs root (daemons, network namespaces)"
    if not SCRIPT.is_file():
        return f"{SCRIPT} missing"
    have_slurm = all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "slurm-wlm/munge not installed and no apt-get to install them"
    for tool in ("ip", "nsenter", "runuser", "flock"):
        if not shutil.which(tool):
            return f"{tool} not found"
    return None


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = child_environ(LOCAL_CLUSTER_DIR=str(STATE_DIR))
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_env_sh(path: Path) -> dict[str, str]:
    """The `export K=V` lines of env.sh (values optionally double-quoted)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            out[k] = v.strip('"')
    return out


@dataclass
class Cluster:
    """A running local cluster: its environment and small helpers around the Slurm commands."""

    nodes: list[str]
    addrs: list[str]
    ifname: str
    env: dict[str, str] = field(repr=False)
    state_dir: Path = STATE_DIR

    @property
    def conf(self) -> str:
        return self.env["SLURM_CONF"]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def netns_cmd(self, node: str, *cmd: str) -> list[str]:
        """argv running `cmd` in `node`'s network namespace (two-node cluster only). nsenter, not
        `ip netns exec`, which remounts /sys and hides /sys/fs/cgroup."""
        return ["nsenter", f"--net=/run/netns/{node}", *cmd]

    def sbatch(self, script_text: str, *, workdir: Path, **opts) -> str:
        """Submit `script_text` (a whole batch script, #! line included) from `workdir`; returns the
        job id. Keyword options become sbatch flags: ntasks=2 -> --ntasks=2, open_mode="append"
        -> --open-mode=append, requeue=True -> --requeue."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        script = workdir / f"job-{time.monotonic_ns()}.sh"
        script.write_text(script_text)
        flags = []
        for k, v in opts.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                flags.append(flag)
            elif v not in (False, None):
                flags.append(f"{flag}={v}")
        r = self.run("sbatch", "--parsable", *flags, str(script), cwd=workdir)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} once the record is gone)."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        fields = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, timeout: float = 120, states=FINAL_STATES, poll: float = 0.25) -> str:
        """Poll until the job reaches one of `states` (default: a final state); returns it. The
        record stays for MinJobAge=120 s after the end, so poll at least that often."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise AssertionError(f"job {job_id} still {state} after {timeout} s: {self.job(job_id)}")


class ClusterManager:
    """Brings clusters up and down through the script; remembers what it brought up."""

    def __init__(self):
        self.up_nodes: int | None = None

    def up(self, nodes: int) -> Cluster:
        r = run_script("up", "--nodes", str(nodes))
        if r.returncode != 0:
            raise AssertionError(f"local-cluster.sh up --nodes {nodes} failed:\n{r.stdout}\n{r.stderr}\n"
                                 + _logs_tail())
        self.up_nodes = nodes
        facts = read_env_sh(STATE_DIR / "env.sh")
        env = child_environ(**facts)
        return Cluster(nodes=facts["MLITE_NODES"].split(), addrs=facts["MLITE_NODE_ADDRS"].split(),
                       ifname=facts["MLITE_IFNAME"], env=env)

    def down(self) -> None:
        r = run_script("down")
        assert r.returncode == 0, f"local-cluster.sh down failed:\n{r.stdout}\n{r.stderr}"
        self.up_nodes = None


def _logs_tail(n: int = 30) -> str:
    out = []
    for log in sorted((STATE_DIR / "log").glob("*")):
        try:
            lines = log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            continue
        out.append(f"--- {log}\n" + "\n".join(lines))
    return "\n".join(out)

