"""Tensor-parallel communication volume per training step vs Megatron's analytic volume, and
step time tp=1 vs tp=2 on this machine.

comm.py counts the logical payload of every collective (all-reduce: its tensor; all-gather: the
gathered tensor; reduce-scatter: the full input). One training step (forward, backward, the
sequence-parallel grad sync and the clipping norm) is measured on rank 0 and compared, op kind by
op kind, with the analytic count (b micro-batch, s sequence, h hidden, L layers, 4-byte floats):

  without SP (all-reduce):    L * 4 * bsh            2 per layer forward (attn proj, fc2 outputs),
                                                     2 backward (qkv and fc1 input grads)
                              + bsh                  embedding forward (vocab-parallel lookup)
                              + bsh                  LM head input grad (backward)
                              + 3 * bs               vocab-parallel CE: max, sum-exp, target logit
                              + 1                    clipping: sum of squares of the sharded grads
  with SP:  all-gather        L * 2 * bsh (fwd, before qkv/fc1) + L * 2 * bsh (bwd of the
                              reduce-scatters) + bsh (embedding scatter, bwd) + bsh (LM head, fwd)
                              + L * 2 * bsh + bsh (bwd: the qkv/fc1 and LM head inputs are saved as
                              sequence shards and gathered again for their weight gradients)
            reduce-scatter    L * 2 * bsh (fwd, proj/fc2) + L * 2 * bsh (bwd of the all-gathers)
                              + bsh (LM head, bwd)
            all-reduce        bsh (embedding) + 3 * bs (CE) + 1 (clip) + P_sp (grads of norms and
                              row-parallel biases, which saw only a sequence shard)
Goal: measured / analytic = 1.00 for every kind (no hidden collectives).

    python benchmarks/bench_tp_comm.py [--layers 4 --hidden 256 --seq 128 --batch 4 --steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.model import GPT  # noqa: E402
from megatron_lite.testing import spawn_json  # noqa: E402


def model_cfg(a) -> ModelConfig:
    return ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
                       num_attention_heads=a.heads, max_sequence_length=a.seq)


def analytic(a, sp: bool, p_sp: int) -> dict[str, int]:
    b, s, h, L = a.batch, a.seq, a.hidden, a.layers
    bsh, bs, f = b * s * h, b * s, 4
    if not sp:
        return {"all_reduce": f * (L * 4 * bsh + bsh + bsh + 3 * bs + 1)}
    return {"all_gather": f * (L * 4 * bsh + 2 * bsh) + f * (L * 2 * bsh + bsh),
            "reduce_scatter": f * (L * 4 * bsh + bsh),
            "all_reduce": f * (bsh + 3 * bs + 1 + p_sp)}


def batch(a):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def step_fn(model, opt, x, y, group):
    from megatron_lite.parallel.grads import GradSync
    opt.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    GradSync(tp_group=group).finish_and_clip(model, 1.0)  # serial (group None): torch's own clip
    opt.step()


def worker(rank, world, a, sp):
    import torch.distributed as dist

    from megatron_lite.distributed import comm
    from megatron_lite.parallel.tensor_parallel import parallelize
    group = dist.group.WORLD
    model = parallelize(GPT(model_cfg(a), seed=0), group, sequence_parallel=sp,
                        make_vocab_divisible_by=128).model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch(a)
    step_fn(model, opt, x, y, group)  # warm-up
    stats = comm.CommStats()
    with stats.recording():
        step_fn(model, opt, x, y, group)
    counted = dict(stats.bytes)
    p_sp = sum(p.numel() for p in model.parameters() if getattr(p, "sequence_parallel", False))
    times = []
    for _ in range(a.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step_fn(model, opt, x, y, group)
        times.append(time.perf_counter() - t0)
    return {"bytes": counted, "p_sp": p_sp, "times": times}


def run_serial(a) -> list[float]:
    torch.set_num_threads(a.tp)  # the same cores the tp ranks use together
    model = GPT(model_cfg(a), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch(a)
    step_fn(model, opt, x, y, None)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step_fn(model, opt, x, y, None)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/tp_comm.json"))
    a = p.parse_args()

    results = {"shape": {k: getattr(a, k)
                         for k in ("tp", "layers", "hidden", "heads", "seq", "batch", "vocab")},
               "torch": torch.__version__, "runs": {}}
    serial_times = run_serial(a)
    results["runs"]["tp1"] = {"step_s": statistics.median(serial_times)}
    rows = []
    for sp in (False, True):
        r = spawn_json(worker, a.tp, a, sp)
        want = analytic(a, sp, r["p_sp"])
        got = {k: r["bytes"].get(k, 0) for k in set(want) | set(r["bytes"])}
        ratio = {k: (got[k] / want[k] if want.get(k) else float("inf")) for k in got}
        name = f"tp{a.tp}" + ("_sp" if sp else "")
        results["runs"][name] = {"bytes": got, "analytic_bytes": want, "ratio": ratio,
                                 "step_s": statistics.median(r["times"])}
        for k in sorted(got):
            rows.append(f"| tp={a.tp}{' + SP' if sp else ''} | {k} | {got[k]:,} | {want.get(k, 0):,} | "
                        f"{ratio[k]:.4f} |")
    write_json(a.out, results)
    print(json.dumps(results, indent=2))
    t1 = results["runs"]["tp1"]["step_s"]
    body = [
        f"Shape: {a.layers} layers x {a.hidden} wide, {a.heads} heads, seq {a.seq}, micro-batch {a.batch}, "
        f"vocab {a.vocab} (padded to a multiple of 128 x tp); one training step (fwd, bwd, SP grad sync, "
        f"clip norm) counted on rank 0 by comm.py; gloo, CPU.",
        "",
        "| layout | op | measured bytes | analytic bytes | ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Step time on this machine (median of {a.steps}; same {a.tp} cores in each run): tp=1 {t1:.3f} s, "
        f"tp={a.tp} {results['runs'][f'tp{a.tp}']['step_s']:.3f} s, tp={a.tp}+SP "
        f"{results['runs'][f'tp{a.tp}_sp']['step_s']:.3f} s. Recorded for reference: on one CPU the "
        f"ranks share the cores, so TP here costs communication without adding compute.",
    ]
    write_section(ROOT / "docs/benchmarks.md", "tp_comm", "\n".join(body))


if __name__ == "__main__":
    main()
