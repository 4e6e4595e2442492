"""Single-process training throughput: megatron_lite GPT vs HF transformers GPT2LMHeadModel.

Identical shape (GPT-2 architecture), same batch, same optimizer (AdamW), same process. Runs are
alternated (ours, HF, ours, HF, ...) so drift in machine speed hits both alike; the ratio is the
median of our tokens/s over the median of HF's. Peak memory is measured per model in a fresh
subprocess (peak RSS on CPU, max allocated on CUDA), since a process's peak RSS cannot be split
between two models. Writes benchmarks/results/throughput.json and the table in docs/benchmarks.md.

    python benchmarks/bench_throughput.py [--rounds 5 --steps 5] [--profile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.model import GPT  # noqa: E402

KINDS = ("ours", "ours_plain", "hf")


def shapes(args) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_attention_heads=args.heads, max_sequence_length=args.seq)


def build(kind: str, cfg: ModelConfig, device):
    if kind in ("ours", "ours_plain"):
        model = GPT(cfg, seed=0)
        model.lm_head.fused_loss = kind == "ours"  # ours_plain: lm_head + F.cross_entropy, for the ablation
        step_loss = lambda x, y: model(x, y)[1]  # noqa: E731
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_sequence_length,
                        n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf._attn_implementation = "sdpa"  # the same fused attention kernel as ours
        model = GPT2LMHeadModel(hf)
        # HF shifts labels internally, so pass inputs as labels on a (T+1)-long window.
        step_loss = lambda x, y: model(input_ids=x, labels=x).loss  # noqa: E731
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, step_loss


def batch(args, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    return ids


def run_steps(opt, step_loss, ids, steps, kind, device) -> float:
    """Seconds per optimizer step over `steps` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        if kind != "hf":
            loss = step_loss(ids[:, :-1], ids[:, 1:])
        else:
            loss = step_loss(ids[:, :-1], None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def peak_rss_mib() -> float:
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_child(args, kind: str) -> dict:
    """Run in a subprocess: peak memory of a few training steps of one model."""
    device = torch.device(args.device)
    cfg = shapes(args)
    base_rss = peak_rss_mib()
    _, opt, step_loss = build(kind, cfg, device)
    ids = batch(args, device)
    run_steps(opt, step_loss, ids, 3, kind, device)
    peak_rss = peak_rss_mib()
    out = {"peak_rss_mib": round(peak_rss, 1), "rss_over_baseline_mib": round(peak_rss - base_rss, 1)}
    if device.type == "cuda":
        out["max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def profile(args, kind: str) -> str:
    device = torch.device(args.device)
    _, opt, step_loss = build(kind, shapes(args), device)
    ids = batch(args, device)
    run_steps(opt, step_loss, ids, 2, kind, device)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(opt, step_loss, ids, 2, kind, device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per timed run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="print the top ops of each model")
    p.add_argument("--memory-child", choices=["ours", "ours_plain", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/throughput.json"))
    args = p.parse_args()

    if args.memory_child:
        print(json.dumps(memory_child(args, args.memory_child)))
        return
    if args.profile:
        for kind in KINDS:
            print(f"==== {kind} ====\n{profile(args, kind)}")
        return

    device = torch.device(args.device)
    cfg = shapes(args)
    models = {k: build(k, cfg, device) for k in KINDS}
    n_params = {k: sum(p.numel() for p in m[0].parameters()) for k, m in models.items()}
    assert len(set(n_params.values())) == 1, n_params  # truly the same shape
    ids = batch(args, device)
    for kind, (_, opt, step_loss) in models.items():  # warm-up (allocator, kernels)
        run_steps(opt, step_loss, ids, 2, kind, device)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(args.rounds):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
            _, opt, step_loss = models[kind]
            times[kind].append(run_steps(opt, step_loss, ids, args.steps, kind, device))
    tokens = args.batch * args.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    del models
    memory = {}
    for kind in KINDS:
        cmd = [sys.executable, __file__, "--memory-child", kind, "--device", args.device,
               *sum(([f"--{k}", str(getattr(args, k))]
                     for k in ("layers", "hidden", "heads", "seq", "batch", "vocab")), [])]
        memory[kind] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    result = {
        "benchmark": "single-process training throughput vs HF GPT2LMHeadModel",
        "shape": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "seq": args.seq,
                  "batch": args.batch, "vocab": args.vocab, "params": n_params["ours"]},
        "device": args.device if device.type == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "platform": platform.platform(), "rounds": args.rounds, "steps_per_run": args.steps,
        "seconds_per_step": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "ratio_ours_over_hf": round(tps["ours"] / tps["hf"], 3),
        "ratio_ours_plain_head_over_hf": round(tps["ours_plain"] / tps["hf"], 3),
        "memory": memory,
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    mem_key = "max_allocated_mib" if device.type == "cuda" else "rss_over_baseline_mib"
    table = [
        f"Shape: {args.layers} layers x {args.hidden} wide, {args.heads} heads, seq {args.seq}, batch "
        f"{args.batch}, vocab {args.vocab} ({n_params['ours'] / 1e6:.1f}M params); device "
        f"{result['device']}, {result['threads']} threads, torch {torch.__version__}; median of "
        f"{args.rounds} alternating runs x {args.steps} AdamW steps.",
        "",
        "| model | tokens/s | s/step | peak memory (MiB, " + mem_key + ") |",
        "|---|---|---|---|",
    ]
    for kind, name in (("ours", "megatron_lite GPT (fused linear+CE loss)"),
                       ("ours_plain", "megatron_lite GPT, plain lm_head + F.cross_entropy"),
                       ("hf", "HF GPT2LMHeadModel (sdpa)")):
        table.append(f"| {name} | {tps[kind]:,.0f} | {statistics.median(times[kind]):.3f} | "
                     f"{memory[kind][mem_key]:,.0f} |")
    table += ["", f"**Ratio ours / HF: {result['ratio_ours_over_hf']:.3f}x** (goal >= 1.2x); with the plain "
              f"head {result['ratio_ours_plain_head_over_hf']:.3f}x."]
    write_section(ROOT / "docs/benchmarks.md", "throughput", "\n".join(table))


if __name__ == "__main__":
    main()
