"""launch/local-cluster.sh: real one- and two-node SLURM clusters on this machine, and the Slurm
behaviour the launchers rely on (requeue, signals; the facts are written up in
megatron_lite/testing/cluster.py).

Needs root; skips otherwise (and when slurm cannot be installed). Ordered to switch clusters
rarely: one-node tests, then two-node tests, then `down`.
"""

import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from megatron_lite.testing.cluster import STATE_DIR, run_script, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]

PRINT_RANK = "srun python3 -c 'import os; print(os.environ[\"SLURM_PROCID\"])'"


def _pids() -> dict[str, int]:
    return {p.name: int(p.read_text()) for p in (STATE_DIR / "pids").glob("*.pid") if p.read_text().strip()}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _usr1_receivers(out: Path) -> list[str]:
    return sorted(re.findall(r"(batch-shell|child-of-task\d|task\d) got USR1", out.read_text()))


def _wait_for_text(path: Path, needle: str, count: int = 1, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.count(needle) >= count:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} x{count} not in {path} after {timeout} s:\n{text}")


# ------------------------------------------------------------------------------------------------
# one node


def test_one_node_job_runs_two_and_four_tasks(slurm_one_node, tmp_path):
    c = slurm_one_node
    j2 = c.sbatch(f"#!/bin/bash\n{PRINT_RANK}\n", workdir=tmp_path, ntasks=2, output="two.out")
    # The declared node has >= 4 CPUs even on a 2-core machine: the training tests run 4 ranks.
    j4 = c.sbatch(f"#!/bin/bash\n{PRINT_RANK}\n", workdir=tmp_path, ntasks=4, output="four.out")
    assert c.wait(j2) == "COMPLETED", c.job(j2)
    assert c.wait(j4) == "COMPLETED", c.job(j4)
    assert sorted((tmp_path / "two.out").read_text().split()) == ["0", "1"]
    assert sorted((tmp_path / "four.out").read_text().split()) == ["0", "1", "2", "3"]


def test_up_twice_is_a_no_op(slurm_one_node):
    before = _pids()
    t0 = time.monotonic()
    r = run_script("up", "--nodes", "1")
    assert r.returncode == 0, r.stderr
    assert "already up" in r.stderr
    assert f"export SLURM_CONF={slurm_one_node.conf}" in r.stdout
    assert _pids() == before, "a second `up` restarted daemons"
    assert time.monotonic() - t0 < 10
    assert run_script("status").returncode == 0


def test_fact_a_self_requeue(slurm_one_node, tmp_path):
    """(a) `scontrol requeue` from the batch script, then `scontrol update StartTime=now`."""
    c = slurm_one_node
    script = """#!/bin/bash
echo "run restart=${SLURM_RESTART_COUNT:-0}"
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    scontrol requeue $SLURM_JOB_ID; echo "requeue rc=$?"
    scontrol update JobId=$SLURM_JOB_ID StartTime=now; echo "update rc=$?"
    sleep 60
fi
echo done
"""
    out = tmp_path / "rq.out"
    job = c.sbatch(script, workdir=tmp_path, output=out.name, open_mode="append")
    _wait_for_text(out, "run restart=0")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = c.job(job)
        if info.get("JobState") == "PENDING" and info.get("Restarts") == "1":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"job never went back to PENDING: {c.job(job)}")
    # The requeue delays the job: eligible 121 s after the requeue; the in-script update did not help.
    assert info["Reason"] == "BeginTime", info
    delay = (datetime.fromisoformat(info["EligibleTime"]) - datetime.fromisoformat(info["SubmitTime"]))
    assert delay.total_seconds() >= 60, info
    # Restarts=1 is the proof the in-script requeue worked. Its `echo` may never run: the requeue
    # cancels the batch step, which can kill the shell before scontrol's exit status is printed.
    text = out.read_text()
    print(f"\n(a) after requeue: {info['JobState']} Reason={info['Reason']} eligible "
          f"{delay.total_seconds():.0f} s after requeue; requeue echo ran: {'requeue rc=' in text}; "
          f"in-script update ran: {'update rc=' in text}")
    # Root resets the eligibility from outside: the job runs again at once.
    t0 = time.monotonic()
    c.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    c.wait(job, timeout=60, states={"RUNNING", "COMPLETING", "COMPLETED"}, poll=0.05)
    restart_s = time.monotonic() - t0
    assert c.wait(job) == "COMPLETED", c.job(job)
    text = out.read_text()
    assert "run restart=1" in text and text.rstrip().endswith("done"), text
    print(f"(a) StartTime=now from outside -> running again after {restart_s:.2f} s")
    assert restart_s < 30


SIGNAL_JOB = r"""#!/bin/bash
trap 'echo "batch-shell got USR1"' USR1
cat >child-$SLURM_JOB_ID.py <<'PY'
import os, signal, time
def on_usr1(sig, frame):
    print(f"child-of-task{os.environ['SLURM_PROCID']} got USR1", flush=True)
signal.signal(signal.SIGUSR1, on_usr1)
print("child ready", flush=True)
time.sleep(float(os.environ["HOLD"]))
PY
# Each task: a shell that traps USR1, with a python child that handles it too.
srun bash -c "trap 'echo task\$SLURM_PROCID got USR1' USR1; python3 -u child-$SLURM_JOB_ID.py & wait; wait" &
# `wait` returns early when a trapped signal arrives: wait again for srun.
wait; wait
echo "batch exit"
"""


def test_fact_b_scancel_signal_targets(slurm_one_node, tmp_path):
    """(b) Who gets `scancel --signal=USR1` (plain, -b, --full)."""
    c = slurm_one_node
    jobs = {}
    for flag, ntasks in (("", 2), ("-b", 1), ("--full", 1)):
        out = tmp_path / f"sig{flag or '-none'}.out"
        jobs[flag] = (c.sbatch(SIGNAL_JOB, workdir=tmp_path, ntasks=ntasks, output=out.name,
                               export="ALL,HOLD=6"), out, ntasks)
    for flag, (job, out, ntasks) in jobs.items():
        _wait_for_text(out, "child ready", ntasks)
        c.run("scancel", *([flag] if flag else []), "--signal=USR1", job)
    got = {}
    for flag, (job, out, _) in jobs.items():
        assert c.wait(job) == "COMPLETED", c.job(job)
        got[flag] = _usr1_receivers(out)
        print(f"\n(b) scancel {flag or '(no flag)'} --signal=USR1: {got[flag]}")
    # Plain: every task of the step, not the batch shell; the tasks' children only without
    # proctrack/cgroup (here when there is no cgroup v1 freezer; see the two-node variant).
    cgroup = "ProctrackType=proctrack/cgroup" in Path(c.conf).read_text()
    children = [] if cgroup else ["child-of-task0", "child-of-task1"]
    assert got[""] == children + ["task0", "task1"]
    assert got["-b"] == ["batch-shell"]
    if cgroup:
        assert got["--full"] == ["batch-shell", "task0"]


def test_fact_c_signal_before_time_limit(slurm_one_node, tmp_path):
    """(c) `--signal=USR1@30 --time=1`: when does the signal arrive (and to whom)?"""
    c = slurm_one_node
    script = """#!/bin/bash
t0=$(date +%s.%N)
trap 'echo "batch got USR1 $(date +%s.%N)"' USR1
echo "start $t0"
srun bash -c 'trap "echo task got USR1 \\$(date +%s.%N)" USR1; while true; do sleep 0.2; done' &
while true; do wait; done
"""
    jobs = {sig: c.sbatch(script, workdir=tmp_path, ntasks=1, time=1, signal=sig, output=f"{i}.out")
            for i, sig in enumerate(("USR1@30", "B:USR1@30"))}
    for sig, job in jobs.items():
        state = c.wait(job, timeout=200)
        info = c.job(job)
        assert state == "TIMEOUT", info
        text = (tmp_path / f"{list(jobs).index(sig)}.out").read_text()
        t0 = float(re.search(r"start ([\d.]+)", text).group(1))
        got = re.findall(r"(batch|task) got USR1 ([\d.]+)", text)
        assert len(got) == 1, text
        who, when = got[0][0], float(got[0][1]) - t0
        run_s = (datetime.fromisoformat(info["EndTime"]) - datetime.fromisoformat(info["StartTime"]))
        print(f"\n(c) --time=1 --signal={sig}: {who} got USR1 {when:.1f} s after start; "
              f"killed (TIMEOUT) after {run_s.total_seconds():.0f} s")
        assert who == ("batch" if sig.startswith("B:") else "task")
        # Resolution: slurmctld checks time limits every 30 s; the limit is 60 s.
        assert 0 < when < 60


# ------------------------------------------------------------------------------------------------
# two nodes


def test_two_nodes_tasks_talk_tcp(slurm_two_nodes, tmp_path):
    c = slurm_two_nodes
    assert c.nodes == ["mlite-n1", "mlite-n2"] and c.addrs == ["10.213.77.11", "10.213.77.12"]
    assert c.ifname == "eth0"
    r = c.run("srun", "-N2", "printenv", "SLURMD_NODENAME", timeout=60)
    assert sorted(r.stdout.split()) == c.nodes
    # The head node's address, as a launcher finds it: NodeAddr from scontrol (and, for the
    # usual idiom, the node name resolves through the marked /etc/hosts lines).
    script = r"""#!/bin/bash
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
addr=$(scontrol show node "$head" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
echo "head=$head addr=$addr resolved=$(getent hosts "$head" | awk '{print $1}')"
srun python3 -c '
import os, socket, sys, time
addr = sys.argv[1]
if os.environ["SLURM_PROCID"] == "0":
    s = socket.create_server(("0.0.0.0", 29555))
    conn, peer = s.accept()
    print("rank0 got", conn.recv(100).decode(), "from", peer[0], flush=True)
    conn.sendall(b"pong from " + os.environ["SLURMD_NODENAME"].encode())
else:
    for _ in range(100):
        try:
            conn = socket.create_connection((addr, 29555))
            break
        except OSError:
            time.sleep(0.1)
    conn.sendall(b"ping from " + os.environ["SLURMD_NODENAME"].encode())
    print("rank1 got", conn.recv(100).decode(), flush=True)
' "$addr"
"""
    job = c.sbatch(script, workdir=tmp_path, nodes=2, ntasks_per_node=1, output="tcp.out")
    assert c.wait(job) == "COMPLETED", (c.job(job), (tmp_path / "tcp.out").read_text())
    text = (tmp_path / "tcp.out").read_text()
    assert "head=mlite-n1 addr=10.213.77.11 resolved=10.213.77.11" in text, text
    assert "rank0 got ping from mlite-n2 from 10.213.77.12" in text, text
    assert "rank1 got pong from mlite-n1" in text, text


def test_two_nodes_scancel_signal_reaches_task_children(slurm_two_nodes, tmp_path):
    """(b) with proctrack/linuxproc (the two-node cluster: cgroups would collide between the two
    slurmds): the signal reaches the whole process tree of each task, children included."""
    c = slurm_two_nodes
    assert "ProctrackType=proctrack/linuxproc" in Path(c.conf).read_text()
    out = tmp_path / "sig.out"
    job = c.sbatch(SIGNAL_JOB, workdir=tmp_path, nodes=2, ntasks_per_node=1, output=out.name,
                   export="ALL,HOLD=6")
    _wait_for_text(out, "child ready", 2)
    c.run("scancel", "--signal=USR1", job)
    assert c.wait(job) == "COMPLETED", c.job(job)
    got = _usr1_receivers(out)
    print(f"\n(b) two nodes (linuxproc), scancel --signal=USR1: {got}")
    assert got == ["child-of-task0", "child-of-task1", "task0", "task1"]


def test_two_nodes_plain_processes_in_namespaces(slurm_two_nodes):
    """Outside Slurm (e.g. plain torchrun): nsenter into the namespaces, talk over eth0."""
    c = slurm_two_nodes
    server = subprocess.Popen(
        c.netns_cmd(c.nodes[0], "python3", "-c",
                    "import socket; s = socket.create_server(('0.0.0.0', 29556)); c, a = s.accept();"
                    " c.sendall(('hello ' + a[0]).encode())"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = ("import socket, time\nfor _ in range(100):\n    try:\n"
                  f"        c = socket.create_connection(('{c.addrs[0]}', 29556)); break\n"
                  "    except OSError: time.sleep(0.1)\nprint(c.recv(100).decode())")
        r = c.run(*c.netns_cmd(c.nodes[1], "python3", "-c", client), timeout=60)
        assert r.stdout.strip() == f"hello {c.addrs[1]}"
        # /sys/fs/cgroup stays visible with nsenter (unlike `ip netns exec`).
        assert c.run(*c.netns_cmd(c.nodes[1], "ls", "/sys/fs/cgroup")).stdout.strip()
    finally:
        server.kill()
        server.wait()


def test_down_stops_everything_and_is_repeatable(slurm_two_nodes, local_cluster):
    pids = _pids()
    assert {"munged.pid", "slurmctld.pid", "slurmd-mlite-n1.pid", "slurmd-mlite-n2.pid"} <= set(pids)
    t0 = time.monotonic()
    local_cluster.down()
    print(f"\ndown (two nodes) took {time.monotonic() - t0:.2f} s")
    time.sleep(0.5)  # init reaps the daemons
    assert not [n for n, p in pids.items() if _alive(p)], pids
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "mlite-" not in netns
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "mlbr0" not in links and "mlite-v" not in links
    assert "megatron-lite local-cluster" not in Path("/etc/hosts").read_text()
    assert run_script("down").returncode == 0
    assert run_script("status").returncode == 3  # "down"
