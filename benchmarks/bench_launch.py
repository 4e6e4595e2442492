"""How fast a run answers its launcher: preemption signals and rank failures, measured end to end
through the CLI on this machine (gloo, CPU).

  signal    SIGTERM to a training process (single process; and to the torchrun agent of a dp=2 job):
            seconds from the signal to the committed checkpoint (the `latest` pointer renamed into
            place) and to the exit of every process; the step time for scale (the signal is taken at
            the next step boundary, so a step is part of the wait).
            Models: the tiny test model and GPT-2 125M (sequence 128, micro-batch 1, so a CPU step
            stays short).
  failure   a dp=2 torchrun job, one rank SIGKILLed or SIGSTOPped: seconds until the other rank has
            exited and until the whole job has, against launch.collective_timeout_s.
  nodes     (root only) the same tp2 x dp2 job on one node and on two "nodes" (network namespaces of
            launch/local-cluster.sh, 2 ranks each, gloo over a veth bridge): median step time. Both
            share this machine's 2 cores, so this is for the record, not a network measurement.
  elastic   (root only) `launch torchrun --nnodes 1:2`, 2 ranks per namespace node, global batch 16:
            a node killed (launcher and workers SIGKILLed) during a dp4 run, and a node joining a dp2
            run: seconds from the death (the newcomer's launch) to the first step of the new group,
            and the steps lost (computed after the newest checkpoint, every 10 steps here).

Pick SLURM's `--signal=USR1@T` from the first table: T > signal-to-commit + 60 s (SLURM may send
the signal up to a minute late).

    python benchmarks/bench_launch.py [--timeout 10] [--only elastic]   # --only: the rest from --out
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.testing.faults import (  # noqa: E402
    alive,
    children,
    finish,
    hurt_one_rank,
    kill_node,
    overrides,
    start,
    torchrun_argv,
    train_argv,
    wait_step,
)
from megatron_lite.train.metrics import read_metrics  # noqa: E402

GPT2 = ["model.vocab_size=50257", "model.hidden_size=768", "model.num_layers=12",
        "model.num_attention_heads=12", "model.max_sequence_length=128", "model.position_embedding=learned",
        "model.norm=layernorm", "model.activation=gelu", "model.tie_embeddings=true", "model.bias=true",
        "data.micro_batch_size=1", "parallel.make_vocab_divisible_by=128"]


def prepare(data: Path) -> None:
    from megatron_lite.data import prepare as prep
    prep(["stdlib"], data, tokenizer="bpe", vocab_size=512, max_bytes=400_000)


def _ovr(data: Path, out: Path, model: str, *extra: str) -> list[str]:
    return overrides(data, out, "train.steps=100000", *(GPT2 if model == "gpt2-125m" else []), *extra)


def signal_to_checkpoint(tmp: Path, data: Path, model: str, launcher: str) -> dict:
    out = tmp / f"{model}-{launcher}"
    extra = ["parallel.dp=2"] if launcher == "torchrun" else []
    argv = (torchrun_argv if launcher == "torchrun" else train_argv)(*_ovr(data, out, model, *extra))
    proc = start(argv, tmp / f"{model}-{launcher}.log")
    wait_step(out, 3, proc, timeout=600)
    procs = [proc.pid, *children(proc.pid)]
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc, tmp / f"{model}-{launcher}.log", timeout=600)
    while any(alive(p) for p in procs):
        time.sleep(0.01)
    t_exit = time.time()
    latest = out / "checkpoints" / "latest"
    assert code in (75, 128 + signal.SIGTERM), text[-2000:]
    t_commit = latest.stat().st_mtime
    size = sum(f.stat().st_size for f in (latest.parent / latest.read_text().strip()).iterdir())
    tokens = 128 if model == "gpt2-125m" else 32 * 4
    tps = list(read_metrics(out, "train/tokens_per_s").values())[1:]
    return {"model": model, "launcher": launcher, "signal_to_commit_s": t_commit - t0,
            "signal_to_exit_s": t_exit - t0, "step_s": statistics.median(tokens / t for t in tps),
            "checkpoint_bytes": size}


def failure(tmp: Path, data: Path, how: str, timeout: float) -> dict:
    out = tmp / f"fail-{how}"
    argv = torchrun_argv(*_ovr(data, out, "tiny", "parallel.dp=2", f"launch.collective_timeout_s={timeout}"))
    r = hurt_one_rank(argv, tmp / f"fail-{how}.log", out, how, timeout)
    return {"failure": how, "timeout_s": timeout, "other_rank_exit_s": r["other_rank_exit_s"],
            "job_exit_s": r["job_exit_s"]}


def nodes(tmp: Path, data: Path, steps: int = 300) -> list[dict]:
    """Median step time of one tp2 x dp2 job on one node vs across the two namespace nodes."""
    from megatron_lite.testing.cluster import ClusterManager, skip_reason
    if skip_reason():
        return []
    manager = ClusterManager()
    cluster = manager.up(2)
    rows = []
    try:
        par = ["parallel.tp=2", "parallel.dp=2", f"train.steps={steps}"]
        single = tmp / "one-node"
        proc = start(torchrun_argv(*_ovr(data, single, "tiny", *par)), tmp / "one-node.log")
        finish(proc, tmp / "one-node.log")
        multi = tmp / "two-nodes"
        head = cluster.addrs[0]
        procs = [start(torchrun_argv(*_ovr(data, multi, "tiny", *par),
                                     launcher=["--nnodes", "2", "--rdzv-endpoint", f"{head}:29471",
                                               "--rdzv-id", "bench", "--local-addr", addr]),
                       tmp / f"{node}.log", prefix=cluster.netns_cmd(node), GLOO_SOCKET_IFNAME=cluster.ifname)
                 for node, addr in zip(cluster.nodes, cluster.addrs, strict=True)]
        for p, node in zip(procs, cluster.nodes, strict=True):
            code, text = finish(p, tmp / f"{node}.log")
            assert code == 0, text[-2000:]
        for name, out in (("1 node x 4 ranks", single), ("2 nodes x 2 ranks", multi)):
            tps = list(read_metrics(out, "train/tokens_per_s").values())[10:]
            rows.append({"nodes": name, "step_s": statistics.median(32 * 4 * 2 / t for t in tps)})
    finally:
        manager.down()
    return rows


def _resume_row(out: Path) -> dict | None:
    text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""
    rows = [json.loads(line) for line in text.splitlines() if "resume/world" in line]
    return rows[-1] if rows else None


def elastic(tmp: Path, data: Path) -> list[dict]:
    """A node dying under a dp4 job and a node joining a dp2 job, both `--nnodes 1:2`."""
    from megatron_lite.testing.cluster import ClusterManager, skip_reason
    if skip_reason():
        return []
    manager = ClusterManager()
    cluster = manager.up(2)
    rows = []

    def node(i: int, out: Path, port: int, steps: int):
        argv = torchrun_argv(*_ovr(data, out, "tiny", f"train.steps={steps}", "data.global_batch_size=16",
                                   "checkpoint.interval=10"),
                             launcher=["--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-endpoint",
                                       f"{cluster.addrs[0]}:{port}", "--rdzv-id", f"bench-{port}",
                                       "--local-addr", cluster.addrs[i],
                                       "--rdzv-conf", "last_call_timeout=3"])
        return start(argv, tmp / f"elastic-{port}-{i}.log", prefix=cluster.netns_cmd(cluster.nodes[i]),
                     GLOO_SOCKET_IFNAME=cluster.ifname)

    def first_step_after(out: Path, since: float, proc) -> dict:
        while (row := _resume_row(out)) is None:
            assert proc.poll() is None and time.time() - since < 300, "no resume recorded"
            time.sleep(0.05)
        return {**row, "to_first_step_s": (out / "metrics.jsonl").stat().st_mtime - since}

    try:
        out = tmp / "elastic-death"
        a, b = node(0, out, 29491, 60), node(1, out, 29491, 60)
        wait_step(out, 15, a, timeout=300)
        t0 = time.time()
        kill_node(b.pid)
        row = first_step_after(out, t0, a)
        finish(a, tmp / "elastic-29491-0.log")
        b.wait()
        rows.append({"event": "node killed (dp4 -> dp2)", **row})

        out = tmp / "elastic-join"
        a = node(0, out, 29492, 3000)
        wait_step(out, 20, a, timeout=300)
        t0 = time.time()
        b = node(1, out, 29492, 3000)
        row = first_step_after(out, t0, a)
        for p in (a, b):
            p.send_signal(signal.SIGTERM)  # enough measured: stop both with a checkpoint
        for p, i in ((a, 0), (b, 1)):
            finish(p, tmp / f"elastic-29492-{i}.log")
        rows.append({"event": "node joined (dp2 -> dp4)", **row})
    finally:
        manager.down()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timeout", type=float, default=10.0, help="launch.collective_timeout_s for failures")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/launch.json"))
    ap.add_argument("--only", choices=["elastic"], default=None,
                    help="run only this part; the others' rows are read from --out")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = tmp / "data"
        prepare(data)
        if a.only:
            old = json.loads(Path(a.out).read_text())
            signals, failures, multinode = old["signals"], old["failures"], old["nodes"]
        else:
            signals = [signal_to_checkpoint(tmp, data, m, launcher) for m in ("tiny", "gpt2-125m")
                       for launcher in ("single", "torchrun")]
            failures = [failure(tmp, data, how, a.timeout) for how in ("kill", "stall")]
            multinode = nodes(tmp, data)
        membership = elastic(tmp, data)
    import torch
    write_json(a.out, {"torch": torch.__version__, "signals": signals, "failures": failures,
                       "nodes": multinode, "elastic": membership})
    table = ["SIGTERM to a training run on this machine (CPU, gloo; torchrun: dp=2, the signal to the "
             "agent). The stop is taken at the next step boundary; the checkpoint is committed when "
             "`latest` is renamed into place.", "",
             "| model | launcher | step (s) | checkpoint (MB) | signal -> committed (s) "
             "| signal -> all exited (s) |",
             "|---|---|---|---|---|---|"]
    for r in signals:
        table.append(f"| {r['model']} | {r['launcher']} | {r['step_s']:.3f} "
                     f"| {r['checkpoint_bytes'] / 1e6:,.1f} | {r['signal_to_commit_s']:.2f} "
                     f"| {r['signal_to_exit_s']:.2f} |")
    table += ["", f"A dp=2 torchrun job with launch.collective_timeout_s={a.timeout:g}, one rank hurt:", "",
              "| failure | other rank exited (s) | whole job exited (s) | timeout (s) |", "|---|---|---|---|"]
    for r in failures:
        table.append(f"| {r['failure']} | {r['other_rank_exit_s']:.1f} | {r['job_exit_s']:.1f} | "
                     f"{r['timeout_s']:g} |")
    table += ["", "A killed rank's peers see the closed connection at once; a stalled rank is found by the "
              "timeout. A stopped process cannot act on SIGTERM: torchrun kills it after its fixed 30 s "
              "shutdown wait, which is what the whole-job time adds for a stall."]
    if multinode:
        table += ["", "The same tp=2 x dp=2 tiny job (global batch 8 x 32 tokens) on one node and across "
                  "the two network-namespace nodes of launch/local-cluster.sh (all on these 2 cores; gloo "
                  "over a veth bridge between the nodes):", "", "| nodes | median step (ms) |", "|---|---|"]
        table += [f"| {r['nodes']} | {1000 * r['step_s']:.1f} |" for r in multinode]
    if membership:
        table += ["", "Elastic `launch torchrun --nnodes 1:2` (2 ranks per namespace node, global batch 16, "
                  "a checkpoint every 10 steps): from the node's death (the newcomer's launch) to the "
                  "first step of the new group, and the steps computed since the newest checkpoint "
                  "(lost). A joining node stops the running group with SIGTERM: it checkpoints first, so "
                  "nothing is lost; its time includes the newcomer's own startup.", "",
                  "| event | resumed at step | world | steps lost | to the first new step (s) |",
                  "|---|---|---|---|---|"]
        table += [f"| {r['event']} | {r['step']} | {r['resume/world_before']} -> {r['resume/world']} | "
                  f"{r['resume/steps_lost']} | {r['to_first_step_s']:.1f} |" for r in membership]
    write_section(ROOT / "docs/benchmarks.md", "launch", "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
