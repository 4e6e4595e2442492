"""Peak memory of one rank of a real training run, for checking megatron_lite/plan/memory.py's model.

Run it like the trainer (one process, or under torch.distributed.run with gloo):

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/plan_memory_probe.py \
        --out DIR -- model.hidden_size=512 ... parallel.tp=2

Each rank first warms up (a GPT on the meta device, a tiny GPT's forward, backward and optimizer
step through optim.make_optimizer under the run's precision: bf16 weights, no autocast): code that
torch loads on first use is process overhead, not model state (the trainer builds a meta GPT for
its FLOP count: ~74 MiB of RSS on first use). Then it
builds the real Trainer (same layout checks, process groups, model, parallelize, backend),
records its resident set size just before the model is built, resets the kernel's peak
counter there (writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS), runs --steps
training steps (train_step: no evaluation, no checkpoint) and writes DIR/rank_N.json:
  baseline_rss   VmRSS before the model: interpreter, torch and its lazily loaded code, the gloo
                 group, the opened data
  peak_hwm       VmHWM after the steps
  measured       peak_hwm - baseline_rss: what the model, its gradients, optimizer state and the
                 steps' activations made the process hold (compared with plan.peak_memory(...).total)
  ru_maxrss      what the trainer logs as train/memory_gb (lifetime peak, baseline included)
With --idle it only imports torch and reports that process's RSS (the bare baseline); --idle --warm
also imports the trainer and runs the warm-up (the baseline of a single `megatron-lite train`).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def warm_up(precision: str) -> None:
    """Load what torch loads on first use (meta-device registrations, CPU kernels in the run's dtype,
    AdamW), with a model of a few kilobytes through the trainer's own optimizer path (bf16 weights in
    the distributed optimizer's buckets under bf16, no autocast), so the baseline taken before the
    real model holds it."""
    import torch

    from megatron_lite.config import ModelConfig, OptimConfig
    from megatron_lite.model import GPT
    from megatron_lite.optim import make_optimizer
    from megatron_lite.parallel.grads import GradSync
    mc = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2,
                     max_sequence_length=16)
    with torch.device("meta"):
        GPT(mc, seed=None)
    model = GPT(mc, seed=0)
    opt = make_optimizer(model, OptimConfig(), precision, GradSync())
    x = torch.randint(0, 64, (2, 16))
    for mode in ("none", "selective", "full"):
        model.set_recompute(mode)
        _, loss = model(x, x)
        loss.backward()
    opt.finish()
    opt.clip(1.0)
    opt.step()
    opt.zero_grad()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--idle", action="store_true", help="import torch, build nothing, report RSS")
    ap.add_argument("--warm", action="store_true", help="with --idle: also import the trainer and warm up")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    torch.set_num_threads(1)
    if a.idle:  # the bare baseline; --warm: with the trainer's modules and torch's lazy code loaded
        if a.warm:
            import megatron_lite.train  # noqa: F401
            warm_up("fp32")
            warm_up("bf16")
        name = "idle_warm.json" if a.warm else "idle.json"
        (out / name).write_text(json.dumps({"rss": status_kib("VmRSS") * 1024,
                                            "hwm": status_kib("VmHWM") * 1024}))
        return
    from megatron_lite.config import Config
    from megatron_lite.distributed import comm
    from megatron_lite.distributed.env import RunEnv
    from megatron_lite.train import Trainer

    marks: dict = {}

    class Probe(Trainer):
        def _build_model(self):
            marks["baseline_rss"] = status_kib("VmRSS") * 1024
            reset_peak()
            return super()._build_model()

    cfg = Config.from_yaml(None, a.overrides)
    env = RunEnv.from_environ()
    warm_up(cfg.train.precision)
    trainer = Probe(cfg, env)
    for _ in range(a.steps):
        trainer.train_step()
    peak = status_kib("VmHWM") * 1024
    row = {"rank": env.rank, "coord": vars(trainer.coord), "baseline_rss": marks["baseline_rss"],
           "peak_hwm": peak, "measured": peak - marks["baseline_rss"],
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "steps": a.steps, "overrides": a.overrides}
    (out / f"rank_{env.rank}.json").write_text(json.dumps(row, indent=1))
    comm.destroy(barrier=env.distributed)
    if env.distributed:
        comm.exit_process(0)  # like the CLI: no native teardown of the gloo groups


if __name__ == "__main__":
    main()
