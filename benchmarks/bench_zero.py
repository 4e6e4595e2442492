"""Optimizer-state and gradient bytes held per rank under ZeRO stages 0-3, and step time, at dp=2
and dp=4 (gloo, CPU, fp32).

Counted per rank, right after the backward of a step (gradients) and after the step (optimizer):
  optimizer state   tensors in the torch AdamW state this rank holds (exp_avg, exp_avg_sq), plus,
                    for DeepSpeed, the fp32 master partitions it keeps (its AdamW's own params)
  gradients         every param.grad still allocated, plus DeepSpeed's partitioned gradient
                    buffers (averaged_gradients; stage 3's flat grad partition buffer)
Ideal: what the stage shards is full / dp (state for stage >= 1, gradients for stage >= 2),
everything else full; ratio = measured / ideal, goal <= 1.05. Full sizes: Adam state 2 x N x 4
bytes (+ N x 4 master copy for DeepSpeed), gradients N x 4.

    python benchmarks/bench_zero.py [--layers 4 --hidden 256 --vocab 4096 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.testing import spawn_json  # noqa: E402

VARIANTS = [("stage 0 (AdamW)", 0, "native"), ("stage 1 native", 1, "native"),
            ("stage 1 DeepSpeed", 1, "deepspeed"), ("stage 2 DeepSpeed", 2, "deepspeed"),
            ("stage 3 DeepSpeed", 3, "deepspeed")]


def tensor_bytes(objs) -> int:
    seen: set[int] = set()
    total = 0

    def visit(o):
        nonlocal total
        if isinstance(o, torch.Tensor):
            storage = o.untyped_storage()
            # Count each storage once (views into one flat buffer are one allocation); skip the
            # scalar step counters.
            if o.numel() > 1 and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)
    visit(objs)
    return total


def measure(model, opt, ds, stage):
    """(optimizer-state bytes, gradient bytes) this rank holds."""
    if ds is not None:
        inner = ds.optimizer
        state = tensor_bytes(list(inner.optimizer.state.values()))
        masters = getattr(inner, "single_partition_of_fp32_groups", None)
        if masters is None:
            masters = getattr(inner, "fp32_partitioned_groups_flat", [])
        state += tensor_bytes(list(masters))
        grads = tensor_bytes([p.grad for p in model.parameters() if p.grad is not None])
        grads += tensor_bytes(getattr(inner, "averaged_gradients", {}))
        flat = getattr(inner, "grad_partitions_flat_buffer", None)
        grads += tensor_bytes(flat) if flat is not None else 0
        return state, grads
    holder = getattr(opt, "optim", opt)
    return tensor_bytes(list(holder.state.values())), tensor_bytes([p.grad for p in model.parameters()
                                                                     if p.grad is not None])


def worker(rank, world, store, a, out):
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_lite.config import Config
    from megatron_lite.layout import Layout
    from megatron_lite.model import GPT
    from megatron_lite.optim import build_optimizer
    from megatron_lite.parallel.grads import GradSync
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = []
        for name, stage, backend in VARIANTS:
            cfg = Config.from_yaml(None, [f"model.vocab_size={a.vocab}", f"model.hidden_size={a.hidden}",
                                          f"model.num_layers={a.layers}", "model.num_attention_heads=4",
                                          f"model.max_sequence_length={a.seq}", f"parallel.dp={world}",
                                          f"optim.zero.stage={stage}", f"optim.zero.backend={backend}",
                                          "data.micro_batch_size=2"])
            layout = Layout.build(cfg, world)
            groups = layout.topology.build(rank)
            model = GPT(cfg.model, seed=0)
            n = sum(p.numel() for p in model.parameters())
            opt = build_optimizer(model, cfg.optim, dp_group=groups.dp)
            ds = None
            if backend == "deepspeed":
                from megatron_lite.optim.deepspeed import initialize
                ds = initialize(model, opt, layout, groups)
            g = torch.Generator().manual_seed(rank)
            x = torch.randint(0, a.vocab, (2, a.seq), generator=g)
            times, grads = [], 0
            for _ in range(a.steps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                if ds is not None:
                    ds.backward(ds(x, x)[1])
                    grads = measure(model, opt, ds, stage)[1]
                    ds.step()
                else:
                    opt.zero_grad(set_to_none=True)
                    model(x, x)[1].backward()
                    GradSync(dp_group=groups.dp).finish(model)
                    grads = measure(model, opt, None, stage)[1]
                    opt.step()
                times.append(time.perf_counter() - t0)
            state = measure(model, opt, ds, stage)[0]
            full_state = 2 * n * 4 + (n * 4 if ds is not None else 0)
            ideal_state = full_state / world if stage >= 1 else full_state
            ideal_grads = n * 4 / world if stage >= 2 else n * 4
            rows.append({"variant": name, "dp": world, "rank": rank, "params": n, "state_bytes": state,
                         "grad_bytes": grads, "state_ratio": state / ideal_state,
                         "grad_ratio": grads / ideal_grads, "step_s": statistics.median(times[1:])})
            del ds, opt, model
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            Path(out).write_text(json.dumps([r for rs in gathered for r in rs]))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/zero.json"))
    a = p.parse_args()
    rows = spawn_json(worker, 2, a) + spawn_json(worker, 4, a)
    write_json(a.out, {"shape": vars(a), "torch": torch.__version__, "rows": rows})
    n = rows[0]["params"]
    table = [f"Model: {a.layers} layers x {a.hidden} wide, vocab {a.vocab} ({n / 1e6:.2f}M params, fp32); "
             f"gloo on this 2-core CPU; worst rank shown; step time median of {a.steps}.", "",
             "| variant | dp | optimizer state / rank (MiB) | ratio to ideal | gradients / rank (MiB) | "
             "ratio to ideal | step (s) | vs stage 0 |", "|---|---|---|---|---|---|---|---|"]
    for dp in (2, 4):
        base = max(r["step_s"] for r in rows if r["dp"] == dp and r["variant"] == VARIANTS[0][0])
        for name, _, _ in VARIANTS:
            rs = [r for r in rows if r["dp"] == dp and r["variant"] == name]
            w = max(rs, key=lambda r: r["state_ratio"])
            step = max(r["step_s"] for r in rs)
            table.append(f"| {name} | {dp} | {w['state_bytes'] / 2**20:.1f} "
                         f"| {max(r['state_ratio'] for r in rs):.3f} "
                         f"| {max(r['grad_bytes'] for r in rs) / 2**20:.1f} "
                         f"| {max(r['grad_ratio'] for r in rs):.3f} "
                         f"| {step:.3f} | {step / base:.2f}x |")
    write_section(ROOT / "docs/benchmarks.md", "zero", "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
