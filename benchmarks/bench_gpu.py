"""Single-GPU training: throughput, MFU and peak memory of the trainer itself, eager and compiled, beside
nanoGPT's model (benchmarks/nanogpt_model.py, its own training step) at the same shapes, and the peak
memory `plan` predicts for the same run.

Each run is its own process (a fresh allocator, so torch.cuda.max_memory_allocated is that run's peak):

  - ours:    megatron_lite.train.Trainer on the preset (configs/gpt2-125m.yaml, ...), precision bf16 (bf16
             weights, fp32 main gradients, masters and moments), data read from a prepared directory of
             random tokens (the real memmap loader), Trainer.train_step timed over --steps steps after
             --warmup; `train.compile=true` for the compiled rows.
  - nanogpt: nanoGPT's GPT at the same shapes (vocab 50257 unpadded, as ours), nanoGPT's train.py step:
             fp32 weights under bf16 autocast, fused AdamW, clip 1.0; random batches already on the GPU;
             `torch.compile(model)` for the compiled rows.

MFU for both is tokens/s x megatron_lite.model.counts.flops_per_token / the GPU's dense bf16 peak
(train/metrics.py), so the two columns differ only by time. Results are appended to --out as each run
ends (a run cut short by the device's time limit keeps the ones before it).

On a CUDA machine:  python3 benchmarks/bench_gpu.py --out $OUT/gpu.json
Here, afterwards:   python benchmarks/bench_gpu.py --report-only --out benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, preset, sequence length, micro-batch): GPT-2 small/medium and GPT-3 XL shapes, one micro-batch
# per step (train.grad_accum=1) so a step is one forward, one backward and one optimizer step.
CASES = {
    "tiny": ("configs/tiny.yaml", 128, 4, []),  # a CPU smoke run (tests/unit/test_bench_gpu.py)
    "gpt2-125m": ("configs/gpt2-125m.yaml", 1024, 16, []),
    "gpt2-350m": ("configs/gpt2-350m.yaml", 1024, 16, []),
    "gpt-1.3b": ("configs/gpt-1.3b.yaml", 2048, 8, []),
    # GPT-2 small with 8 experts of width 1536, 2 per token, in every block: the dense model's active MLP
    # FLOPs (2 x 1536 = 4h) on 4x its MLP parameters (ours only: nanoGPT has no MoE).
    "gpt2-125m-moe8": ("configs/gpt2-125m.yaml", 1024, 16,
                       ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.intermediate_size=1536"]),
}
# The order runs happen in: what matters most first, so a cut-short run still answers it.
RUNS = [
    ("ours", "gpt2-125m", False), ("nanogpt", "gpt2-125m", False),
    ("ours", "gpt-1.3b", False), ("nanogpt", "gpt-1.3b", False),
    ("ours", "gpt2-350m", False), ("ours", "gpt2-125m-moe8", False),
    ("ours", "gpt2-125m", True), ("nanogpt", "gpt2-125m", True),
    ("ours", "gpt-1.3b", True), ("nanogpt", "gpt-1.3b", True),
]


def overrides(case: str, data_dir: str, out_dir: str, device: str, compile_: bool) -> list[str]:
    _, seq, micro, extra = CASES[case]
    return [*extra, f"data.dir={data_dir}", f"data.micro_batch_size={micro}",
            f"model.max_sequence_length={seq}",
            "train.grad_accum=1", f"train.device={device}", f"train.out_dir={out_dir}",
            "train.precision=bf16", f"train.compile={str(compile_).lower()}", "log.tensorboard=false"]


def random_tokens_dir(path: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    """A prepared data directory (meta.json + {train,val}.bin) of uniform random token ids: the loader's
    real path without a tokenizer (throughput does not depend on which tokens they are)."""
    import numpy as np

    from megatron_lite.data.prepare import FORMAT_VERSION
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("val", tokens // 20), ("train", tokens)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(path / f"{split}.bin")
        splits[split] = {"documents": 1, "tokens": n}
    meta = {"format": FORMAT_VERSION, "tokenizer": None, "vocab_size": vocab, "eot_id": vocab - 1,
            "dtype": "uint16", "sources": ["random"], "seed": seed, "splits": splits}
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


def _timed(step, a) -> tuple[float, float]:
    """(seconds of the first warmup step, mean seconds per step after warmup); with --profile DIR, then
    three more steps under torch.profiler, their tables written to DIR."""
    sync = _sync(a.device)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(a.warmup - 1):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    per_step = (time.perf_counter() - t0) / a.steps
    if a.profile:
        _profile(step, a, sync)
    return first, per_step


def _profile(step, a, sync, steps: int = 3) -> None:
    """Where a step's time goes: kernels by device time, operators by host time, and the wall time per
    profiled step (against the device's busy time: a host-bound step has the device idle)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    sort = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
    name = f"profile_{a.impl}_{a.case}{'_compile' if a.compile else ''}.txt"
    Path(a.profile).mkdir(parents=True, exist_ok=True)
    (Path(a.profile) / name).write_text(
        f"{a.impl} {a.case} compile={a.compile}: wall {1e3 * wall:.2f} ms/step under the profiler, {steps} "
        f"steps (the first table's 'Self CUDA time total' is the device's busy time)\n\nby device time:\n"
        f"{events.table(sort_by=sort, row_limit=40)}\nby host time:\n"
        f"{events.table(sort_by='self_cpu_time_total', row_limit=30)}\n")


def run_ours(a) -> dict:
    import torch

    from megatron_lite import plan
    from megatron_lite.config import Config
    from megatron_lite.distributed.env import RunEnv
    from megatron_lite.layout import Layout
    from megatron_lite.train import Trainer
    preset = str(ROOT / CASES[a.case][0])
    with tempfile.TemporaryDirectory() as out:
        cfg = Config.from_yaml(preset, overrides(a.case, a.data, out, a.device, a.compile))
        predicted = plan.memory_of(Layout.build(cfg), 0, 0, "cuda")
        trainer = Trainer(cfg, RunEnv())
        losses, tokens = [], [trainer.state.tokens]

        def step():
            losses.append(trainer.train_step().loss)
            tokens.append(trainer.state.tokens)
        first, per_step = _timed(step, a)
        tokens_per_step = tokens[1] - tokens[0]  # the trainer's own count (every step is one batch)
        flops, peak = trainer.flops_per_token, trainer.peak
        trainer.close()
    r = _result(a, tokens_per_step, per_step, first, flops, peak, losses)
    if a.device == "cuda":
        r["plan_predicted_gib"] = round(predicted.total / 2**30, 3)
        r["plan_phase"] = predicted.phase
        r["plan_error"] = round(predicted.total / (r["peak_gib"] * 2**30) - 1, 4)
        r["plan_terms_gib"] = {k: round(getattr(predicted, k) / 2**30, 3) for k in
                               ("weights", "grads", "optimizer", "activations", "transient")}
    del torch
    return r


def run_nanogpt(a) -> dict:
    import torch

    from benchmarks.nanogpt_model import GPT, GPTConfig
    from megatron_lite.config import Config
    from megatron_lite.model.counts import flops_per_token
    from megatron_lite.train.metrics import peak_flops
    cfg = Config.from_yaml(str(ROOT / CASES[a.case][0]), overrides(a.case, a.data, "/tmp", a.device, False))
    mc, seq, micro = cfg.model, CASES[a.case][1], CASES[a.case][2]
    torch.manual_seed(0)
    device = torch.device(a.device)
    model = GPT(GPTConfig(block_size=seq, vocab_size=mc.vocab_size, n_layer=mc.num_layers,
                          n_head=mc.num_attention_heads, n_embd=mc.hidden_size, dropout=0.0,
                          bias=True)).to(device)
    # nanoGPT's configure_optimizers: decay on matrices only, the fused AdamW kernel on CUDA.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    net = torch.compile(model) if a.compile else model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mc.vocab_size, (micro, seq + 1), generator=g).to(device)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # as nanoGPT's get_batch
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    losses = []

    def step():
        with amp:
            _, loss = net(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # as ours: the step's loss on the host
    first, per_step = _timed(step, a)
    flops = flops_per_token(mc, seq)
    return _result(a, micro * seq, per_step, first, flops, peak_flops(device, None), losses)


def _sync(device: str):
    import torch
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _result(a, tokens_per_step: int, per_step: float, first: float, flops: float, peak: float,
            losses: list[float]) -> dict:
    import torch
    tps = tokens_per_step / per_step
    r = {"impl": a.impl, "case": a.case, "compile": a.compile, "seq": CASES[a.case][1],
         "micro_batch": CASES[a.case][2], "tokens_per_step": tokens_per_step,
         "step_ms": round(1e3 * per_step, 2),
         "first_step_s": round(first, 2), "tokens_per_s": round(tps), "mfu": round(tps * flops / peak, 4),
         "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}
    if a.device == "cuda":
        r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return r


def child(a) -> None:
    r = run_ours(a) if a.impl == "ours" else run_nanogpt(a)
    print("RESULT " + json.dumps(r), flush=True)


def environment(device: str) -> dict:
    import torch
    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def measure(a) -> None:
    out = Path(a.out)
    res = {"environment": environment(a.device), "steps": a.steps, "warmup": a.warmup, "runs": [],
           "commit": os.environ.get("BENCH_COMMIT", "?")}
    from megatron_lite.config import Config
    runs = [(impl, case, c) for impl, case, c in RUNS + [(i, "tiny", c) for i in ("ours", "nanogpt") for c in
                                                          (False, True)]
            if case in (a.cases or [k for k in CASES if k != "tiny"]) and (a.compile_runs or not c)
            and f"{impl}:{case}{':compile' if c else ''}" not in a.skip]
    with tempfile.TemporaryDirectory() as d:
        dirs: dict[int, Path] = {}
        for impl, case, compile_ in runs:
            vocab = Config.from_yaml(str(ROOT / CASES[case][0])).model.vocab_size
            if vocab not in dirs:
                dirs[vocab] = random_tokens_dir(Path(d) / f"random{vocab}", vocab, a.data_tokens)
            data = dirs[vocab]
            cmd = [sys.executable, __file__, "--child", impl, "--case", case, "--data", str(data), "--device",
                   a.device, "--steps", str(a.steps), "--warmup", str(a.warmup)]
            cmd += ["--compile"] if compile_ else []
            cmd += ["--profile", a.profile] if a.profile else []
            t0 = time.time()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.run_timeout)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                r = json.loads(lines[-1][7:]) if lines else {"impl": impl, "case": case, "compile": compile_,
                                                             "error": (p.stderr or p.stdout)[-1500:]}
            except subprocess.TimeoutExpired:
                r = {"impl": impl, "case": case, "compile": compile_, "error": f"timeout {a.run_timeout}s"}
            r["wall_s"] = round(time.time() - t0, 1)
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2) + "\n")


def section(res: dict) -> str:
    env = res["environment"]
    rows = {(r["impl"], r["case"], r["compile"]): r for r in res["runs"]}
    lines = [
        "## Single-GPU training vs nanoGPT, and plan's memory model on a GPU (`benchmarks/bench_gpu.py`)",
        "",
        f"Run with `python3 benchmarks/bench_gpu.py` on one {env.get('gpu', '?')} (torch {env['torch']}, "
        f"CUDA {env.get('cuda', '?')}) at commit {res['commit']}; raw numbers in "
        f"benchmarks/results/gpu.json. One process per row, {res['warmup']} warm-up steps then "
        f"{res['steps']} timed steps of one micro-batch (grad_accum 1). "
        "ours: the Trainer, bf16 weights with fp32 main gradients, masters and moments, the "
        "memmap loader; nanoGPT: its model and train.py step (fp32 weights under bf16 autocast, fused "
        "AdamW). "
        "MFU: tokens/s x the same FLOPs per token (model/counts.py) / 989 TFLOP/s dense bf16. plan: "
        "`plan.memory_of` for the same config on cuda, against torch.cuda.max_memory_allocated.",
        "",
        "| model | seq x micro | compile | ours tok/s | ours MFU | nanoGPT tok/s | nanoGPT MFU "
        "| ours / nanoGPT | ours peak GiB | nanoGPT peak GiB | plan GiB (error) "
        "| first step s (ours / nanoGPT) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, (_, seq, micro, _) in CASES.items():
        for compile_ in (False, True):
            o, n = rows.get(("ours", case, compile_)), rows.get(("nanogpt", case, compile_))
            if o is None and n is None:
                continue

            def cell(r, key, fmt="{:,}"):
                if r is None:
                    return "—"
                if "error" in r:
                    return "failed"
                return fmt.format(r[key]) if key in r else "—"
            ratio = (f"{o['tokens_per_s'] / n['tokens_per_s']:.3f}" if o and n and "error" not in o
                     and "error" not in n else "—")
            plan_cell = (f"{o['plan_predicted_gib']:.2f} ({100 * o['plan_error']:+.1f}%)"
                         if o and "plan_predicted_gib" in o else "—")
            lines.append(
                f"| {case} | {seq} x {micro} | {'yes' if compile_ else 'no'} | {cell(o, 'tokens_per_s')} | "
                f"{cell(o, 'mfu', '{:.1%}')} | {cell(n, 'tokens_per_s')} | {cell(n, 'mfu', '{:.1%}')} | "
                f"{ratio} | "
                f"{cell(o, 'peak_gib', '{:.2f}')} | {cell(n, 'peak_gib', '{:.2f}')} | {plan_cell} | "
                f"{cell(o, 'first_step_s', '{}')} / {cell(n, 'first_step_s', '{}')} |")
    moe, dense = rows.get(("ours", "gpt2-125m-moe8", False)), rows.get(("ours", "gpt2-125m", False))
    if moe and dense and "error" not in moe and "error" not in dense:
        lines += ["", f"Mixture of experts (gpt2-125m-moe8: 8 experts of width 1536, top 2, in every "
                  f"block: the dense model's active FLOPs): {moe['tokens_per_s']:,} tok/s, "
                  f"{moe['tokens_per_s'] / dense['tokens_per_s']:.3f}x the dense gpt2-125m row, peak "
                  f"{moe.get('peak_gib', 0):.2f} GiB (plan {moe.get('plan_predicted_gib', 0):.2f})."]
    for note in res.get("notes", []):  # what later runs and profiles found, kept with the numbers
        lines += ["", note]
    failed = [r for r in res["runs"] if "error" in r]
    for r in failed:
        last = r["error"].strip().splitlines()[-1]
        lines += ["", f"{r['impl']} {r['case']} compile={r['compile']} failed: `{last}`"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", nargs="+", choices=list(CASES), help="only these models")
    ap.add_argument("--no-compile", dest="compile_runs", action="store_false", help="eager rows only")
    ap.add_argument("--skip", nargs="+", default=[], help="rows to leave out, as impl:case[:compile]")
    ap.add_argument("--run-timeout", type=int, default=240, help="seconds per row")
    ap.add_argument("--data-tokens", type=int, default=4_000_000)
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="where the section goes")
    ap.add_argument("--report-only", action="store_true", help="rewrite the docs section from --out")
    ap.add_argument("--child", choices=["ours", "nanogpt"], dest="impl")
    ap.add_argument("--case", choices=list(CASES))
    ap.add_argument("--data")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", help="also profile 3 steps of each row; tables written to this directory")
    a = ap.parse_args()
    if a.impl:
        return child(a)
    if not a.report_only:
        measure(a)
    from benchmarks.report import write_section
    write_section(Path(a.docs), "gpu", section(json.loads(Path(a.out).read_text())))


if __name__ == "__main__":
    main()
