"""Model-state bytes per parameter per rank (weights + gradients + optimizer state) under the
native distributed optimizer and DeepSpeed ZeRO, at dp = 1, 2, 4, 8 (spawned gloo ranks, CPU).

Each variant builds the trainer's own backend (train.backends.build_backend) around a GPT, runs one
training step (forward, backward, step) and counts, per rank, the distinct tensor storages it holds
for the model state, at two moments: right after the backward (the gradients of a step exist) and
right after the step; the larger is reported. Counted:
  weights     every parameter's storage (the bf16 buckets under the distributed optimizer; under its
              ZeRO-3 the persistent shards, the full buckets being released between uses)
  gradients   param.grad, the fp32 main-gradient buffers or shards (and stage 2's staging bucket,
              if one is still alive)
  optimizer   fp32 masters and AdamW moments (DeepSpeed: every tensor its ZeRO optimizer and the
              AdamW inside hold that is not a parameter)
Targets (issue 15): distributed optimizer (bf16, ZeRO-1) <= 6 + 12/d, ZeRO-2 <= 2 + 16/d,
ZeRO-3 <= 18/d bytes per parameter. Activations are not model state and are not counted.

    python benchmarks/bench_zero.py [--layers 4 --hidden 256 --vocab 4096]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.testing import spawn_json  # noqa: E402

# (name, precision, zero stage, backend, target bytes/param as a function of d or None)
VARIANTS = [
    ("fp32 AdamW, no ZeRO", "fp32", 0, "native", lambda d: 16),
    ("bf16, no ZeRO", "bf16", 0, "native", lambda d: 18),
    ("bf16 distributed optimizer (ZeRO-1)", "bf16", 1, "native", lambda d: 6 + 12 / d),
    ("bf16 ZeRO-2", "bf16", 2, "native", lambda d: 2 + 16 / d),
    ("bf16 ZeRO-3", "bf16", 3, "native", lambda d: 18 / d),
    ("fp32 distributed optimizer (ZeRO-1)", "fp32", 1, "native", lambda d: 8 + 8 / d),
    ("DeepSpeed bf16 ZeRO-1", "bf16", 1, "deepspeed", lambda d: 6 + 12 / d),
    ("DeepSpeed bf16 ZeRO-2", "bf16", 2, "deepspeed", lambda d: 2 + 16 / d),
    ("DeepSpeed bf16 ZeRO-3", "bf16", 3, "deepspeed", lambda d: 18 / d),
]


class Storages:
    """Distinct tensor storages, each counted once, under the first kind that claims it."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, obj, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            # scalar step counters skipped
            if obj.numel() > 1 and st.nbytes() and st.data_ptr() not in self.seen:
                self.seen.add(st.data_ptr())
                self.bytes[kind] = self.bytes.get(kind, 0) + st.nbytes()
        elif depth < 4 and isinstance(obj, dict):
            for v in obj.values():
                self.add(kind, v, depth + 1)
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for v in obj:
                self.add(kind, v, depth + 1)


def held(backend) -> dict[str, int]:
    """Model-state bytes this rank holds now, by kind (module docstring)."""
    s = Storages()
    params = list(backend.model.parameters())
    s.add("weights", [p.data for p in params])
    s.add("gradients", [p.grad for p in params if p.grad is not None])
    opt = backend.optimizer
    if hasattr(opt, "buckets"):  # the distributed optimizer
        s.add("gradients", [t for b in opt.buckets for t in (b.grad, b.grad_shard, b.staging)
                            if t is not None])
        s.add("weights", [b.shard_weights for b in opt.buckets])  # ZeRO-3's persistent shards
        s.add("optimizer", [b.master for b in opt.buckets])
        s.add("optimizer", list(opt.adamw.state.values()))
    elif hasattr(opt, "adamw"):  # PlainAdamW
        s.add("optimizer", list(opt.adamw.state.values()))
    else:  # DeepSpeed's ZeRO optimizer: what it and its AdamW hold, parameters already counted
        s.add("optimizer", list(opt.optimizer.state.values()))
        s.add("optimizer", [v for v in vars(opt).values()
                            if isinstance(v, (torch.Tensor, list, dict, tuple))])
    return s.bytes


def worker(rank, world, a):
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from megatron_lite.config import Config
    from megatron_lite.layout import Layout
    from megatron_lite.model import GPT
    from megatron_lite.train.backends import build_backend
    rows = []
    for name, precision, stage, backend_name, target in VARIANTS:
        if backend_name == "deepspeed" and (world < 2 or not a.deepspeed):
            continue
        if stage > 0 and world < 2:
            continue
        cfg = Config.from_yaml(None, [f"model.vocab_size={a.vocab}", f"model.hidden_size={a.hidden}",
                                      f"model.num_layers={a.layers}", "model.num_attention_heads=4",
                                      f"model.max_sequence_length={a.seq}", f"parallel.dp={world}",
                                      f"optim.zero.stage={stage}", f"optim.zero.backend={backend_name}",
                                      f"train.precision={precision}", "data.micro_batch_size=2",
                                      "parallel.make_vocab_divisible_by=8"])
        layout = Layout.build(cfg, world)
        groups = layout.topology.build(rank) if world > 1 else None
        model = GPT(cfg.model, seed=0)
        n = sum(p.numel() for p in model.parameters())
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) \
            if precision == "bf16" and backend_name == "deepspeed" else contextlib.nullcontext
        backend = build_backend(layout, model, groups, torch.device("cpu"), autocast)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, a.vocab, (2, a.seq), generator=g)
        peak: dict[str, int] = {}
        t0 = time.perf_counter()
        for _ in range(2):  # the second step: AdamW state exists, every buffer at its size
            loss = backend.forward_backward([(x, x)])
            after_backward = held(backend)
            backend.step(1e-4, loss)
            after_step = held(backend)
            for h in (after_backward, after_step):
                if sum(h.values()) > sum(peak.values()):
                    peak = h
        rows.append({"variant": name, "dp": world, "rank": rank, "params": n, **peak,
                     "bytes_per_param": sum(peak.values()) / n, "target": target(world),
                     "seconds": time.perf_counter() - t0})
        del backend, model
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return [r for rs in gathered for r in rs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/zero.json"))
    a = p.parse_args()
    rows = [r for d in a.dp for r in spawn_json(worker, d, a)]
    write_json(a.out, {"shape": vars(a), "torch": torch.__version__, "rows": rows})
    n = rows[0]["params"]
    table = [f"Model: {a.layers} layers x {a.hidden} wide, vocab {a.vocab} ({n / 1e6:.2f}M parameters); one "
             f"training step per variant through the trainer's backend; gloo on this 2-core CPU; the fullest "
             f"rank shown (bucket padding included); bytes = distinct tensor storages (weights + gradients + "
             f"optimizer state).", "",
             "| variant | dp | weights | gradients | optimizer | **bytes / param** | target | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, *_ in VARIANTS:
        for d in a.dp:
            rs = [r for r in rows if r["dp"] == d and r["variant"] == name]
            if not rs:
                continue
            w = max(rs, key=lambda r: r["bytes_per_param"])
            per = {k: w.get(k, 0) / n for k in ("weights", "gradients", "optimizer")}
            table.append(f"| {name} | {d} | {per['weights']:.2f} | {per['gradients']:.2f} | "
                         f"{per['optimizer']:.2f} | **{w['bytes_per_param']:.2f}** | {w['target']:.2f} | "
                         f"{w['bytes_per_param'] / w['target']:.3f} |")
    table += ["", "Per parameter, in bytes. Targets: Megatron's distributed optimizer 6 + 12/d "
              "(bf16 weights 2, fp32 main gradients 4, fp32 master + two moments 12/d); ZeRO-2 2 + 16/d; "
              "ZeRO-3 18/d; fp32 "
              "distributed optimizer 8 + 8/d (the fp32 weights are their own master); no ZeRO: 16 (fp32) and "
              "18 (bf16 weights + fp32 grads + masters + moments)."]
    write_section(ROOT / "docs/benchmarks.md", "zero", "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
