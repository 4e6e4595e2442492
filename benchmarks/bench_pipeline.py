"""Pipeline bubble and activation memory per schedule, measured from per-action timestamps.

For GPipe, 1F1B and interleaved 1F1B (v=2) at pp = 2 and 4 with m = 4, 8, 16 micro-batches, each
stage records when every forward and backward ran (PipelineEngine.trace). A stage's idle (bubble)
fraction is 1 - (its compute time) / (the step's wall time, barrier to barrier); the theory is
(p - 1) / (m + p - 1), divided by v for interleaving. The model is uniform (equal blocks per
piece, a small vocabulary so the embedding and head do not unbalance the ends).

Peak activation memory per stage: the most micro-batches whose activations the stage held at once
(peak in-flight), times the bytes autograd saves for one micro-batch through one piece (measured
with saved-tensor hooks). 1F1B should hold at most p micro-batches on stage 0, GPipe m.

Peak memory against m (stage 0, 1F1B and GPipe, m = 4..32): the process's resident-set high-water
mark over one step above its level before the step (VmHWM after resetting it, glibc's mmap
threshold fixed at 64 KiB so every tensor is returned to the system when freed and RSS follows
the live tensors), and the bytes of messages the engine held at its peak (PipelineEngine.trace).
1F1B's should be flat in m (at most pp micro-batches in flight, sends released as soon as the
schedule proves them received); GPipe's grows with m.

On this 2-core machine, pp ranks share the cores: compute times stretch, so the absolute bubble
numbers carry that noise; the ratios to theory are what to read.

    python benchmarks/bench_pipeline.py [--layers 8 --hidden 256 --seq 128 --micro 4 --steps 2]
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

from benchmarks.plan_memory_probe import reset_peak, status_kib  # noqa: E402
from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.testing import spawn_json  # noqa: E402

SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2))
MICROBATCHES = (4, 8, 16)
MEMORY_MICROBATCHES = (4, 8, 16, 32)


def theory(pp: int, m: int, v: int) -> float:
    return (pp - 1) / v / (m + (pp - 1) / v)


def worker(rank, world, a):
    import torch.distributed as dist

    from megatron_lite.config import ModelConfig
    from megatron_lite.distributed.topology import Topology
    from megatron_lite.model import GPT
    from megatron_lite.pipeline.engine import PipelineEngine
    from megatron_lite.pipeline.partition import stage_chunks
    topo = Topology(pp=world)
    groups = topo.build(rank)
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
                      num_attention_heads=4, max_sequence_length=a.seq, tie_embeddings=False)
    results = []
    for schedule, v in SCHEDULES if not a.memory_only else ():
        chunks = stage_chunks(cfg, world, rank, v)
        model = GPT(cfg, seed=0, layers=[i for c in chunks for i in c.layers],
                    embed=any(c.first for c in chunks), head=any(c.last for c in chunks))
        engines = {pf: PipelineEngine(model, chunks, rank, groups.pp_ranks, groups.pp, schedule,
                                      (a.micro, a.seq, a.hidden), torch.device("cpu"), prefetch=pf)
                   for pf in (True, False)}
        act_bytes = activation_bytes(model, chunks[0], a) if not chunks[0].first else \
            activation_bytes(model, chunks[0], a)
        for m in MICROBATCHES:
            g = torch.Generator().manual_seed(0)
            batches = [(torch.randint(0, a.vocab, (a.micro, a.seq), generator=g),) * 2 for _ in range(m)]
            engines[True].run(batches)  # warm-up
            idle: dict[bool, list[float]] = {True: [], False: []}
            peak = 0
            for step in range(a.steps):
                for pf in ((True, False) if step % 2 == 0 else (False, True)):  # alternate: same drift
                    engine = engines[pf]
                    model.zero_grad(set_to_none=True)
                    dist.barrier()
                    t0 = time.perf_counter()
                    engine.run(batches)
                    dist.barrier()
                    wall = time.perf_counter() - t0
                    busy = sum(e - s for k, s, e in engine.trace.events if k in ("F", "B"))
                    idle[pf].append(1 - busy / wall)
                    peak = engine.trace.peak_inflight
            results.append({"schedule": schedule, "v": v, "pp": world, "m": m, "stage": rank,
                            "idle": statistics.median(idle[True]),
                            "idle_no_prefetch": statistics.median(idle[False]),
                            "theory": theory(world, m, v),
                            "peak_inflight": peak, "activation_bytes_per_mb": act_bytes})
    results += memory_rows(cfg, topo, groups, rank, world, a)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    return [r for rs in gathered for r in rs]


def memory_rows(cfg, topo, groups, rank, world, a) -> list[dict]:
    """Stage peak memory of one training step against m, for 1F1B and GPipe."""
    import torch.distributed as dist

    from megatron_lite.model import GPT
    from megatron_lite.pipeline.engine import PipelineEngine
    from megatron_lite.pipeline.partition import stage_chunks
    chunks = stage_chunks(cfg, world, rank, 1)
    model = GPT(cfg, seed=0, layers=chunks[0].layers, embed=chunks[0].first, head=chunks[0].last)
    rows = []
    for schedule in ("1f1b", "gpipe"):
        engine = PipelineEngine(model, chunks, rank, groups.pp_ranks, groups.pp, schedule,
                                (a.micro, a.seq, a.hidden), torch.device("cpu"))
        for m in MEMORY_MICROBATCHES:
            g = torch.Generator().manual_seed(0)
            batches = [(torch.randint(0, a.vocab, (a.micro, a.seq), generator=g),) * 2 for _ in range(m)]
            engine.run(batches)  # warm-up: gradients allocated, lazily loaded code in place
            dist.barrier()
            before = status_kib("VmRSS")
            reset_peak()
            engine.run(batches)
            peak = status_kib("VmHWM")
            rows.append({"memory": schedule, "pp": world, "m": m, "stage": rank,
                         "peak_mib": (peak - before) / 1024,
                         "message_mib": engine.trace.peak_message_bytes / 2**20,
                         "peak_inflight": engine.trace.peak_inflight})
            dist.barrier()
    return rows


def activation_bytes(model, chunk, a) -> int:
    """Bytes autograd saves for one micro-batch through one piece (saved-tensor hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    ids = torch.randint(0, a.vocab, (a.micro, a.seq))
    x = ids if chunk.first else torch.randn(a.micro, a.seq, a.hidden, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.run(x, chunk.layers, ids if chunk.last else None, first=chunk.first, last=chunk.last)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--memory-only", action="store_true",
                   help="only the peak memory against m (keeps the bubble results already written)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/pipeline.json"))
    a = p.parse_args()
    # Every tensor of 64 KiB or more gets its own mapping, returned to the system when freed: the
    # resident-set peak then follows the live tensors (glibc's adaptive threshold would keep freed
    # activations in the heap after the first step and hide a later step's growth).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    rows = spawn_json(worker, 2, a) + spawn_json(worker, 4, a)
    memory = [r for r in rows if "memory" in r]
    rows = [r for r in rows if "memory" not in r]
    if a.memory_only:
        old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
        rows = old.get("rows", [])
    write_json(a.out, {"shape": vars(a), "torch": torch.__version__, "rows": rows, "memory": memory})
    mem = memory_table(memory, a)
    write_section(ROOT / "docs/benchmarks.md", "pipeline_memory", mem)
    print(mem)
    if a.memory_only:
        return
    table = [
        f"Model: {a.layers} layers x {a.hidden} wide, seq {a.seq}, micro-batch {a.micro}, "
        f"vocab {a.vocab}; gloo on this 2-core CPU (pp ranks share the cores); median of {a.steps} steps, "
        f"prefetching and not alternated. Idle = 1 - compute / wall per stage; the table shows stage 0 "
        f"and the worst stage.",
        "",
        "| schedule | pp | m | idle stage 0 | worst idle | theory | worst / theory | same, receives not "
        "prefetched | peak in-flight mb (stage 0) | peak activations stage 0 (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for schedule, v in SCHEDULES:
        for pp in (2, 4):
            for m in MICROBATCHES:
                rs = [r for r in rows if r["schedule"] == schedule and r["pp"] == pp and r["m"] == m]
                s0 = next(r for r in rs if r["stage"] == 0)
                worst = max(r["idle"] for r in rs)
                worst_np = max(r["idle_no_prefetch"] for r in rs)
                mib = (s0["peak_inflight"] * s0["activation_bytes_per_mb"]
                       * (v if schedule == "interleaved" else 1))
                name = schedule + (f" (v={v})" if v > 1 else "")
                table.append(f"| {name} | {pp} | {m} | {s0['idle']:.3f} | {worst:.3f} | {s0['theory']:.3f} | "
                             f"{worst / s0['theory']:.2f} | {worst_np / s0['theory']:.2f} | "
                             f"{s0['peak_inflight']} | {mib / 2**20:.1f} |")
    write_section(ROOT / "docs/benchmarks.md", "pipeline", "\n".join(table))
    print("\n".join(table))


def memory_table(memory: list[dict], a) -> str:
    table = [
        f"Stage 0 of the same model, one training step after a warm-up step; peak = resident-set "
        f"high-water mark above the level before the step (MiB), messages = the engine's peak bytes "
        f"of held messages (MiB); ratio = peak / peak at m = {MEMORY_MICROBATCHES[0]}.",
        "",
        "| schedule | pp | " + " | ".join(f"m={m}: peak / messages / ratio"
                                         for m in MEMORY_MICROBATCHES) + " |",
        "|---|---|" + "---|" * len(MEMORY_MICROBATCHES),
    ]
    for schedule in ("1f1b", "gpipe"):
        for pp in (2, 4):
            rs = {r["m"]: r for r in memory if r["memory"] == schedule and r["pp"] == pp and r["stage"] == 0}
            first = rs[MEMORY_MICROBATCHES[0]]["peak_mib"]
            cells = [f"{rs[m]['peak_mib']:.1f} / {rs[m]['message_mib']:.2f} / {rs[m]['peak_mib'] / first:.2f}"
                     for m in MEMORY_MICROBATCHES]
            table.append(f"| {schedule} | {pp} | " + " | ".join(cells) + " |")
    return "\n".join(table)


if __name__ == "__main__":
    main()
