"""Mixture of experts and expert parallelism (model.moe, parallel.ep; issue 17).

dispatch     Training steps of configs/tiny-moe.yaml's model on 2 gloo ranks at the same global batch
             (2 ranks x micro-batch --micro x 1), the trainer itself (Trainer.train_step):
               ep1   parallel.dp=2: every rank holds all 8 experts; no all-to-all
               ep2   parallel.dp=2, parallel.ep=2: each rank 4 experts, tokens dispatched and combined
                     by all-to-all (parallel/expert_parallel.py)
               ep1_loop  ep1 with model.moe.grouped_gemm=false: the experts' GEMMs one expert at a
                     time (the reference loop) instead of torch._grouped_mm
             comm.CommStats counts the all-to-all payload each rank sends (every row, its own share
             included) against the analytic volume: per MoE layer and micro-batch, the dispatch and
             the combine move the N x top_k routed rows of C values forward and again backward
             (4 N k C x 4 bytes in fp32, dropless), plus the E int64 counts exchanged per forward.
             A rank sends its own N k rows in the dispatch (and the combine's gradient), but the rows
             its experts received in the combine (and the dispatch's gradient): per rank the bytes
             follow the load, summed over the group they are exactly the analytic volume.
             Runs alternate (A B B A ...), a step's time is the slower rank's, tokens/s the median.
balance      configs/tiny-moe.yaml trained --balance-steps steps (one process, `megatron-lite train`)
             three ways: the Switch/GShard balancing loss (aux 0.01, the config's), no balancing at
             all (aux 0, z 0), and DeepSeek-V3's auxiliary-loss-free bias (aux 0, bias_update_rate
             1e-3); the largest per-layer max/mean expert load (metrics.jsonl, the mean of the last
             --tail log steps) and how it went.
convergence  configs/tiny-moe.yaml against configs/tiny.yaml (the dense MLP of the same active width:
             a shared expert of 256 + 2 of 8 routed experts of 128 = 512) for their 600 steps:
             validation loss at every evaluation.
             Losses per step do not depend on the machine's load (deterministic CPU training), so
             this part may run beside other work; dispatch's timing may not.

Writes benchmarks/results/moe.json and the "moe" section of docs/benchmarks.md.

    OMP_NUM_THREADS=1 python benchmarks/bench_moe.py                      # all (~25 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_moe.py --only dispatch      # one part; keeps the others
    OMP_NUM_THREADS=1 python benchmarks/bench_moe.py --quick              # smoke run, records nothing
    python benchmarks/bench_moe.py --render                              # the docs section from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_context import _commit, _machine, wait_for_load  # noqa: E402
from benchmarks.bench_peers import alternate  # noqa: E402
from benchmarks.report import write_json, write_section  # noqa: E402

PARTS = ("dispatch", "balance", "convergence")
VARIANTS = ("ep1", "ep2", "ep1_loop")
BALANCE = {  # name -> overrides of configs/tiny-moe.yaml
    "aux_loss": [],
    "none": ["model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"],
    # DeepSeek-V3 moves its bias by 1e-3 per step against sigmoid scores; softmax scores over 8 experts
    # separate a collapsed router by ~0.5 within tens of steps, which 1e-2 undoes within 300
    "bias": ["model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0", "model.moe.bias_update_rate=0.01"],
}


# ---------------------------------------------------------------------------------------------------
# dispatch: the trainer on 2 ranks, ep1 vs ep2


def _overrides(a, variant: str, out: str) -> list[str]:
    over = [f"data.dir={a.data}", f"data.micro_batch_size={a.micro}", "train.grad_accum=1", "parallel.dp=2",
            "train.device=cpu", "train.progress=false", "train.sample_tokens=0", "train.eval_interval=100000",
            "checkpoint.interval=100000", f"train.out_dir={out}/{variant}", "log.interval=100000"]
    return over + {"ep2": ["parallel.ep=2"], "ep1_loop": ["model.moe.grouped_gemm=false"]}.get(variant, [])


def _dispatch_worker(rank, world, a):
    import torch.distributed as dist

    from megatron_lite.config import Config
    from megatron_lite.distributed import comm
    from megatron_lite.distributed.env import RunEnv
    from megatron_lite.train import Trainer
    env = RunEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, source="explicit")
    with tempfile.TemporaryDirectory() as out:
        config = str(ROOT / "configs/tiny-moe.yaml")
        trainers = {v: Trainer(Config.from_yaml(config, _overrides(a, v, out)), env) for v in VARIANTS}
        for t in trainers.values():  # warm-up, untimed
            for _ in range(a.warmup):
                t.train_step()
        seconds = {v: [] for v in VARIANTS}
        sent = {v: [] for v in VARIANTS}  # all-to-all bytes per step
        calls = {v: [] for v in VARIANTS}
        for name in alternate(VARIANTS, a.rounds):
            stats = comm.CommStats()
            dist.barrier()
            t0 = time.perf_counter()
            with stats.recording():
                for _ in range(a.steps):
                    trainers[name].train_step()
            seconds[name].append((time.perf_counter() - t0) / a.steps)
            sent[name].append(stats.bytes["all_to_all"] / a.steps)
            calls[name].append(stats.calls["all_to_all"] / a.steps)
        mc = trainers["ep2"].cfg.model
        for t in trainers.values():
            t.backend.settle()
    everyone = [None] * world
    dist.all_gather_object(everyone, {"seconds": seconds, "sent": sent, "calls": calls})
    moe_layers = sum(mc.moe.is_moe(i) for i in range(mc.num_layers))
    return {"everyone": everyone, "moe_layers": moe_layers, "num_experts": mc.moe.num_experts,
            "top_k": mc.moe.top_k, "hidden": mc.hidden_size, "seq": mc.max_sequence_length}


def analytic_bytes(moe_layers: int, micro_batches: int, tokens: int, top_k: int, hidden: int,
                   experts: int, dtype_bytes: int = 4) -> int:
    """All-to-all bytes one rank sends per step (dropless, no recompute): per MoE layer and
    micro-batch, dispatch + combine forward and their gradients backward, each the N k routed rows of
    C values; plus the E int64 counts of the forward."""
    rows = tokens * top_k
    return moe_layers * micro_batches * (4 * rows * hidden * dtype_bytes + experts * 8)


def summarize_dispatch(r: dict, a) -> dict:
    everyone = r["everyone"]
    rounds = len(everyone[0]["seconds"]["ep1"])
    sec = {v: [max(e["seconds"][v][i] for e in everyone) for i in range(rounds)] for v in VARIANTS}
    tokens_per_step = 2 * a.micro * r["seq"]
    tps = {v: tokens_per_step / statistics.median(s) for v, s in sec.items()}
    want = analytic_bytes(r["moe_layers"], 1, a.micro * r["seq"], r["top_k"], r["hidden"], r["num_experts"])
    got = [statistics.median(e["sent"]["ep2"]) for e in everyone]
    total = sum(got) / (len(got) * want)  # the group's bytes over the analytic volume of every rank
    return {"tokens_per_step": tokens_per_step,
            "seconds_per_step": {v: [round(s, 4) for s in sec[v]] for v in VARIANTS},
            "tokens_per_s": {v: round(tps[v], 1) for v in VARIANTS},
            "ep2_over_ep1": round(tps["ep2"] / tps["ep1"], 3),
            "grouped_over_loop": round(tps["ep1"] / tps["ep1_loop"], 3),
            "all_to_all_bytes_per_rank": got, "analytic_bytes_per_rank": want,
            "bytes_over_analytic": [round(g / want, 4) for g in got], "group_bytes_over_analytic": total,
            "all_to_all_calls_per_step": [statistics.median(e["calls"]["ep2"]) for e in everyone],
            "ep1_all_to_all_bytes": [statistics.median(e["sent"]["ep1"]) for e in everyone]}


# ---------------------------------------------------------------------------------------------------
# balance and convergence: `megatron-lite train` runs


def train(config: str, overrides: list[str], out: Path) -> list[dict]:
    """One single-process training run; its metrics.jsonl rows."""
    cmd = [sys.executable, "-m", "megatron_lite.cli", "train", "--config", config, f"train.out_dir={out}",
           "train.progress=false", "train.device=cpu", "train.sample_tokens=0", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def balance(a, work: Path) -> dict:
    out = {}
    for name, extra in BALANCE.items():
        settings = [f"data.dir={a.data}", f"train.steps={a.balance_steps}", "log.interval=10",
                    f"optim.warmup_steps={min(50, a.balance_steps // 4)}",
                    "train.eval_interval=100000", "checkpoint.interval=100000", *extra]
        rows = train("configs/tiny-moe.yaml", settings, work / f"balance_{name}")
        logged = [r for r in rows if "moe/load_max_over_mean" in r]
        tail = logged[-a.tail:]
        ratio = [r["moe/load_max_over_mean"] for r in logged]
        out[name] = {"overrides": extra, "max_over_mean_last": round(statistics.mean(ratio[-a.tail:]), 3),
                     "max_over_mean_first": round(ratio[0], 3),
                     "curve": [[r["step"], round(r["moe/load_max_over_mean"], 3)] for r in logged],
                     "final_train_loss": round(statistics.mean(r["train/loss"] for r in tail), 4)}
        print(f"[balance] {name}: max/mean {ratio[0]:.3f} -> {out[name]['max_over_mean_last']}", flush=True)
    return out


def convergence(a, work: Path) -> dict:
    out = {}
    for name, config in (("dense", "configs/tiny.yaml"), ("moe", "configs/tiny-moe.yaml")):
        steps = [f"train.steps={a.conv_steps}", "optim.warmup_steps=2"] if a.conv_steps else []
        rows = train(config, [f"data.dir={a.data}", *steps], work / f"conv_{name}")
        out[name] = [[r["step"], round(r["val/loss"], 4)] for r in rows if "val/loss" in r]
        print(f"[convergence] {name}: {out[name]}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------
# report


def section(result: dict) -> str:
    lines = ["## Mixture of experts and expert parallelism (`benchmarks/bench_moe.py`)", "",
             f"Machine: {result['machine']}."]
    d = result.get("dispatch")
    if d:
        lines += ["", f"**Dispatch** (configs/tiny-moe.yaml's model on 2 gloo ranks, global batch "
                  f"{d['tokens_per_step']} tokens per step, fp32, {d['command']}, commit {d['commit']}, "
                  f"1-minute load {d['load']}):", "",
                  "| layout | tokens/s | s/step (per round) | all-to-all bytes/step/rank | ÷ analytic |",
                  "|---|---:|---|---:|---:|"]
        named = {"ep1": "dp2", "ep2": "dp2, ep2", "ep1_loop": "dp2, grouped_gemm=false"}
        for v in (v for v in VARIANTS if v in d["tokens_per_s"]):
            sent = d["all_to_all_bytes_per_rank"] if v == "ep2" else d["ep1_all_to_all_bytes"]
            ratio = ", ".join(f"{x:.4f}" for x in d["bytes_over_analytic"]) if v == "ep2" else "—"
            lines.append(f"| {v} ({named[v]}) | {d['tokens_per_s'][v]:,.0f} | "
                         f"{', '.join(f'{s:.3f}' for s in d['seconds_per_step'][v])} | "
                         f"{', '.join(f'{int(s):,}' for s in sent)} | {ratio} |")
        lines += ["", f"ep2 / ep1 tokens/s: **{d['ep2_over_ep1']:.3f}**. All-to-all bytes of the group ÷ "
                  f"analytic: **{d['group_bytes_over_analytic']:.6f}** (analytic: "
                  f"{d['analytic_bytes_per_rank']:,} bytes per rank per step, the dispatch and combine of "
                  f"every routed row forward and backward, plus the expert counts; a rank's own share "
                  f"follows how many rows its experts received). On 2 CPU cores ep2 halves each rank's "
                  f"expert parameters and their AdamW work but adds four all-to-alls and the regrouping "
                  f"per MoE layer and micro-batch, with experts' GEMMs of half the rows each, which is "
                  f"what the ratio measures; the point of ep is the memory (plan: Mixtral 8x7B)."]
        if "grouped_over_loop" in d:
            lines += ["", f"torch._grouped_mm (all experts' GEMMs in one call, the group sizes never read on "
                      f"the host) over the loop over experts, ep1: **{d['grouped_over_loop']:.3f}** on CPU. "
                      f"The GPU number is not measured yet."]
    b = result.get("balance")
    if b:
        lines += ["", f"**Load balance** (configs/tiny-moe.yaml, {b['steps']} steps, one process; the "
                  f"largest per-layer max/mean expert load, mean of the last {b['tail']} log steps; 1.0 is "
                  f"perfect, {b['experts'] / b['top_k']:.0f} the worst possible):", "",
                  "| balancing | max/mean at step 10 | at the end | final train loss |",
                  "|---|---:|---:|---:|"]
        for name, r in b["runs"].items():
            lines.append(f"| {name} ({' '.join(r['overrides']) or 'aux 0.01, z 0.001'}) | "
                         f"{r['max_over_mean_first']:.3f} | {r['max_over_mean_last']:.3f} | "
                         f"{r['final_train_loss']} |")
        runs = b["runs"]
        none = runs["none"]
        losses = [r["final_train_loss"] for r in runs.values()]
        spread = (max(losses) - min(losses)) / min(losses)
        lines += ["", f"Without balancing the routers drift towards a few experts "
                  f"({none['max_over_mean_first']:.2f} -> {none['max_over_mean_last']:.2f}); the balancing "
                  f"loss brings the busiest expert to {runs['aux_loss']['max_over_mean_last']:.2f}x the mean "
                  f"and the auxiliary-loss-free bias to {runs['bias']['max_over_mean_last']:.2f}x, without a "
                  f"loss term. At this size and length the final train losses differ by "
                  f"{spread:.1%}."]
    c = result.get("convergence")
    if c:
        steps = [s for s, _ in c["runs"]["dense"]]
        lines += ["", "**Convergence** (validation loss per evaluation, configs/tiny.yaml vs "
                  "configs/tiny-moe.yaml: the same active MLP width, 2.5x the MLP parameters):", "",
                  "| step | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
        for name in ("dense", "moe"):
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for _, v in c["runs"][name]) + " |")
        ahead = [s for (s, d), (_, m) in zip(c["runs"]["dense"], c["runs"]["moe"], strict=True) if m < d]
        lines += ["", f"The MoE model is behind the dense one early and ahead from step {ahead[0]} on "
                  f"(final {c['runs']['moe'][-1][1]:.4f} vs {c['runs']['dense'][-1][1]:.4f})." if ahead else
                  "The MoE model stays behind the dense one at every evaluation."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=PARTS, nargs="+", help="run these parts; the others kept from the JSON")
    p.add_argument("--quick", action="store_true", help="a smoke run; records only --out if given")
    p.add_argument("--render", action="store_true", help="rewrite the docs section from the JSON")
    p.add_argument("--data", default=str(ROOT / "data/stdlib"), help="a prepared corpus (make data)")
    p.add_argument("--micro", type=int, default=8, help="dispatch: micro-batch per rank")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="dispatch: timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--balance-steps", type=int, default=300)
    p.add_argument("--tail", type=int, default=5)
    p.add_argument("--conv-steps", type=int, default=None, help="default: each config's own steps")
    p.add_argument("--max-load", type=float, default=1.0)
    p.add_argument("--wait-load-s", type=float, default=900.0)
    p.add_argument("--out", default=None,
                   help="the JSON (default benchmarks/results/moe.json; --quick: none)")
    a = p.parse_args()
    if a.quick:
        a.micro, a.rounds, a.steps, a.warmup, a.balance_steps, a.tail, a.conv_steps = 2, 2, 1, 1, 20, 1, 20
        a.wait_load_s = 0
    out = a.out or (None if a.quick else str(ROOT / "benchmarks/results/moe.json"))
    if a.render:
        write_section(ROOT / "docs/benchmarks.md", "moe", section(json.loads(Path(out).read_text())))
        return
    old = json.loads(Path(out).read_text()) if out and Path(out).exists() else {}
    parts = a.only or PARTS
    result = {"machine": _machine(), **{k: old[k] for k in PARTS if k in old and k not in parts}}
    command = f"`python benchmarks/bench_moe.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`"
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if "convergence" in parts:
            result["convergence"] = {"runs": convergence(a, work), "command": command, "commit": _commit()}
        if "balance" in parts:
            result["balance"] = {"runs": balance(a, work), "steps": a.balance_steps, "tail": a.tail,
                                 "experts": 8, "top_k": 2, "command": command, "commit": _commit()}
        if "dispatch" in parts:
            waited = wait_for_load(a.max_load, a.wait_load_s)
            before = os.getloadavg()[0]
            from megatron_lite.testing import spawn_json
            raw = spawn_json(_dispatch_worker, 2, a)
            result["dispatch"] = {**summarize_dispatch(raw, a), "waited": waited,
                                  "load": [round(before, 2), round(os.getloadavg()[0], 2)],
                                  "command": command, "commit": _commit()}
            print(json.dumps(result["dispatch"], indent=1), flush=True)
    if out:
        write_json(out, result)
    if not a.quick:
        write_section(ROOT / "docs/benchmarks.md", "moe", section(result))
    else:
        print(section(result))


if __name__ == "__main__":
    main()
