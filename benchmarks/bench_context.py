"""Context parallelism (parallel.cp, issue 16): activation memory per rank and training throughput.

memory      One training forward of a small Llama-like GPT (SwiGLU, RMSNorm, RoPE, GQA) at seq 8192,
            micro-batch 1, on cp = 1, 2, 4 spawned gloo ranks, for both algorithms, fp32 and bf16
            weights (no autocast). Every tensor autograd saves passes through a saved_tensors_hooks
            pack hook; the bytes held are those of the distinct storages behind them, weights
            excluded (as megatron_lite/testing/activations.py counts a block). Each storage is put in
            one class, so the 1/cp claim is checked on what it is about:
              per_token     what a token's own activations make (norm inputs, q/k/v, the MLP,
                            positions, the loss's inputs): the part that must fall as 1/cp
              loss_dw       the fused loss's weight gradient (V, C), computed in the forward and
                            saved: a per-rank constant whatever the sequence
              mask          the ContextShard's bool mask (T/cp, T), one storage for every layer
              mask_float    SDPA's additive float copy of that mask (T/cp, T) in the model's dtype:
                            the CPU flash kernel converts a bool mask and saves the copy, per layer
              gathered_kv   allgather's gathered K and V (B, K, T, D) per layer: the whole sequence's
                            keys on every rank, which do not shrink with cp
              ring_kv       the ring's own contiguous copies of the local K and V (B, K, T/cp, D),
                            saved beside q, whose view keeps the fused qkv output (K and V included)
            cp=1 runs the model as training does without cp (is_causal, no mask), so every class
            but per_token is a cost of cp itself. Peak RSS above the rank's RSS before the forward
            is read too (VmHWM after /proc/self/clear_refs; glibc keeps some freed heap, so it is a
            coarse bound beside the exact saved bytes).
throughput  Training steps (forward, backward, optimizer: the trainer's own Layout -> build_stage ->
            apply_context_parallel -> build_backend, and its shard_batch) of the same model at seq
            4096 on 2 gloo ranks, the same global batch of 2 sequences in each variant:
              cp1_dp2        cp=1, dp=2: each rank one whole sequence (the layout to beat: no
                             attention communication, causal attention skips masked blocks)
              cp2_allgather  cp=2, dp=1, micro-batch 2: each rank half of both sequences
              cp2_ring       the same with ring attention (next K/V block in flight)
            Every rank computes 4096 tokens per step in each variant on its own core. Runs alternate
            (A B C C B A ...), the step time is the slowest rank's, tokens/s the median; comm.CommStats
            records each rank's seconds blocked per op kind (p2p is the ring's attention traffic,
            all_gather/reduce_scatter allgather's, all_reduce the gradients'). Before timing, the
            script waits (up to --wait-load-s) for the 1-minute load average to fall under
            --max-load and records the load it ran at.

Writes benchmarks/results/context.json and the "context" section of docs/benchmarks.md.

    OMP_NUM_THREADS=1 python benchmarks/bench_context.py                 # full (~15 min on 2 idle cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_context.py --quick         # smoke run (~1 min), records nothing
    OMP_NUM_THREADS=1 python benchmarks/bench_context.py --only memory   # one part; keeps the other's JSON
    python benchmarks/bench_context.py --render        # only rewrite the docs section from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_peers import alternate  # noqa: E402
from benchmarks.report import write_json, write_section  # noqa: E402

CLASSES = ("per_token", "loss_dw", "mask", "mask_float", "gathered_kv", "ring_kv")
VARIANTS = ("cp1_dp2", "cp2_allgather", "cp2_ring")
TOLERANCE = 0.10  # issue 16: per-rank activation memory falls as 1/cp within 10%
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_fields(a) -> dict:
    """The benchmark's model (ModelConfig fields): Llama-like, so RoPE reads the shard's global
    positions and GQA's K heads are what allgather gathers; no dropout (cp refuses it)."""
    return dict(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_attention_heads=a.heads,
                num_kv_heads=a.kv_heads, max_sequence_length=max(a.mem_seq, a.tp_seq), activation="swiglu",
                norm="rmsnorm", position_embedding="rope", bias=False, dropout=0.0)


def classify(shape: tuple, T: int, cp: int, *, is_mask: bool = False, dw: tuple | None = None,
             kv_copy: tuple | None = None) -> str:
    """The class of one saved storage (module docstring), from the first tensor seen to save it.
    T: the whole sequence (a rank holds T/cp tokens, so under cp a 4-d tensor with T along a
    sequence dim holds other ranks' tokens); dw: the loss's (V, C); kv_copy: the shape of the ring's
    K/V copies when the tensor owns its storage (None: not the ring, or a view)."""
    shape = tuple(shape)
    if is_mask:
        return "mask"
    if dw is not None and shape == tuple(dw):
        return "loss_dw"
    if cp > 1 and len(shape) == 4 and shape[-2:] == (T // cp, T):
        return "mask_float"  # (B|1, 1, T/cp, T): a query-by-key tensor, SDPA's converted mask
    if cp > 1 and len(shape) == 4 and shape[2] == T:
        return "gathered_kv"  # (B, K, T, D)
    if kv_copy is not None and shape == tuple(kv_copy):
        return "ring_kv"
    return "per_token"


# ---------------------------------------------------------------------------------------------------
# memory: one rank's saved bytes


def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs sets the peak RSS (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_rank(mc, T: int, dtype: torch.dtype, cp: int = 1, algorithm: str | None = None, group=None,
                 ranks: list[int] | None = None, me: int = 0) -> dict:
    """Bytes this rank's training forward saves for backward, by class, and its peak RSS deltas. cp=1:
    the whole sequence, no group (the model as training runs it without cp)."""
    from megatron_lite.model import GPT
    from megatron_lite.model.gpt import split_batch
    from megatron_lite.parallel.context_parallel import apply_context_parallel, shard_batch
    model = GPT(mc, seed=0).to(dtype).train()
    if cp > 1:
        apply_context_parallel(model, group, ranks, me, algorithm)
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def shard(T_):
        g = torch.Generator().manual_seed(0)  # the same sequence on every rank
        ids = torch.randint(0, mc.vocab_size, (1, T_ + 1), generator=g)
        batch = (ids[:, :-1], ids[:, 1:])
        return split_batch(shard_batch(batch, cp, me) if cp > 1 else batch)

    # A short step first: thread pools, kernels and gloo pairs set up outside the measured RSS
    x, y, ctx = shard(8 * cp)
    model(x, y, docs=ctx)[1].backward()
    model.zero_grad(set_to_none=True)

    x, y, ctx = shard(T)
    mask = ctx.mask.untyped_storage()._cdata if ctx is not None else None
    dw = (mc.vocab_size, mc.hidden_size)
    # GQA: a (B, K, T/cp, D) tensor is K or V (q and the output have H heads)
    ring_kv = (1, mc.num_kv_heads, T // cp, mc.head_dim) \
        if algorithm == "ring" and mc.num_kv_heads != mc.num_attention_heads else None
    held: dict[int, tuple[torch.UntypedStorage, str]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in weights and st._cdata not in held:  # the first tensor seen names its class
            own = st.nbytes() == t.numel() * t.element_size()  # not a view into a larger output
            held[st._cdata] = (st, classify(t.shape, T, cp, is_mask=st._cdata == mask, dw=dw,
                                            kv_copy=ring_kv if own else None))
        return t
    rss0 = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y, docs=ctx)
    peak_fwd = _status_kib("VmHWM")
    by_class = dict.fromkeys(CLASSES, 0)
    counts = dict.fromkeys(CLASSES, 0)
    for st, cls in held.values():
        by_class[cls] += st.nbytes()
        counts[cls] += 1
    held.clear()  # drop our references to the storages: the backward frees them
    loss.backward()
    peak_step = _status_kib("VmHWM")
    out = {"bytes": by_class, "storages": counts, "total": sum(by_class.values()), "tokens": x.shape[1]}
    if reset and rss0 is not None:
        out["peak_rss_fwd"] = (peak_fwd - rss0) * 1024
        out["peak_rss_step"] = (peak_step - rss0) * 1024
    return out


def _memory_worker(rank, world, fields, T, dtype_name, algorithm):
    import torch.distributed as dist

    from megatron_lite.config import ModelConfig
    r = measure_rank(ModelConfig(**fields), T, DTYPES[dtype_name], world, algorithm, dist.group.WORLD,
                     list(range(world)), rank)
    everyone = [None] * world
    dist.all_gather_object(everyone, r)
    return everyone


def memory_rows(a) -> list[dict]:
    """measure_rank on every rank of each (dtype, cp, algorithm), fresh processes each (a clean RSS)."""
    from megatron_lite.testing import spawn_json
    rows = []
    for dtype in a.dtypes:
        for cp in a.cps:
            for algorithm in ((None,) if cp == 1 else ("allgather", "ring")):
                t0 = time.perf_counter()
                ranks = spawn_json(_memory_worker, cp, model_fields(a), a.mem_seq, dtype, algorithm)
                top = max(ranks, key=lambda r: r["total"])  # the fullest rank (they should be equal)
                rows.append({"dtype": dtype, "cp": cp, "algorithm": algorithm or "-", **top,
                             "totals_per_rank": [r["total"] for r in ranks],
                             "peak_rss_fwd_per_rank": [r.get("peak_rss_fwd") for r in ranks],
                             "peak_rss_step_per_rank": [r.get("peak_rss_step") for r in ranks],
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(f"[memory] {dtype} cp={cp} {algorithm or '-'}: {_mib(top['total'])} MiB saved "
                      f"({', '.join(f'{k} {_mib(v)}' for k, v in top['bytes'].items())}) "
                      f"in {rows[-1]['seconds']} s", flush=True)
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's ratio to cp=1 of the same dtype, per_token and total, and ratio x cp (1.0 = exact
    1/cp scaling); within TOLERANCE of 1 is the issue's claim."""
    base = {r["dtype"]: r for r in rows if r["cp"] == 1}
    for r in rows:
        b = base.get(r["dtype"])
        if b is None:
            continue
        r["per_token_ratio"] = r["bytes"]["per_token"] / b["bytes"]["per_token"]
        r["total_ratio"] = r["total"] / b["total"]
        r["per_token_scaled"] = r["per_token_ratio"] * r["cp"]  # 1.0 = falls exactly as 1/cp
        r["total_scaled"] = r["total_ratio"] * r["cp"]
        r["per_token_within"] = abs(r["per_token_scaled"] - 1) <= TOLERANCE
        r["total_within"] = abs(r["total_scaled"] - 1) <= TOLERANCE
    return rows


# ---------------------------------------------------------------------------------------------------
# throughput: the trainer's build path on 2 ranks


def variant_overrides(a, variant: str) -> list[str]:
    """Config overrides of one variant: the same model, the same global batch of 2 sequences."""
    fields = model_fields(a)
    over = [f"model.{k}={v}" for k, v in fields.items()]
    over += [f"data.seq_length={a.tp_seq}", "train.device=cpu", "train.precision=fp32",
             "parallel.make_vocab_divisible_by=1", "optim.zero.stage=0"]
    if variant == "cp1_dp2":
        return over + ["parallel.dp=2", "data.micro_batch_size=1"]
    algorithm = variant.split("_", 1)[1]
    return over + ["parallel.cp=2", f"parallel.cp_algorithm={algorithm}", "data.micro_batch_size=2"]


class Variant:
    """One layout's model and backend on this rank, built as Trainer._build builds them, and its
    share of the global batch as Trainer.next_batches/_place hand it over."""

    def __init__(self, a, variant: str, rank: int):
        from megatron_lite.config import Config
        from megatron_lite.layout import Layout
        from megatron_lite.parallel.context_parallel import apply_context_parallel, shard_batch
        from megatron_lite.parallel.tensor_parallel import build_stage
        from megatron_lite.train.backends import build_backend
        cfg = Config.from_yaml(None, variant_overrides(a, variant))
        layout = Layout.build(cfg, 2)
        groups = layout.topology.build(rank)  # collective: every rank builds every variant, in order
        coord = layout.topology.coord(rank)
        torch.manual_seed(cfg.train.seed)
        chunks = layout.chunks(coord.pp)
        self.model, _ = build_stage(cfg.model, cfg.train.seed, [i for c in chunks for i in c.layers],
                                    True, True, torch.device("cpu"), None)
        self.model.set_recompute(cfg.train.recompute, None)
        if layout.cp > 1:
            apply_context_parallel(self.model, groups.cp, groups.cp_ranks, coord.cp,
                                   cfg.parallel.cp_algorithm)
        self.backend = build_backend(layout, self.model, groups, torch.device("cpu"), contextlib.nullcontext)
        self.lr = cfg.optim.lr
        g = torch.Generator().manual_seed(0)  # the global batch: the same 2 sequences in every variant
        ids = torch.randint(0, cfg.model.vocab_size, (2, a.tp_seq + 1), generator=g)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        if layout.cp > 1:  # both sequences, this cp rank's tokens of each
            self.batches = [shard_batch((x, y), layout.cp, coord.cp)]
        else:  # dp rank r: sequence r
            self.batches = [(x[coord.dp:coord.dp + 1], y[coord.dp:coord.dp + 1])]

    def step(self) -> None:
        loss = self.backend.forward_backward(self.batches)
        self.backend.step(self.lr, loss)


def wait_for_load(max_load: float, budget_s: float, poll_s: float = 60.0) -> dict:
    """Sleep until the 1-minute load average is at most max_load, at most budget_s; what was seen."""
    t0, seen = time.monotonic(), [os.getloadavg()[0]]
    while seen[-1] > max_load and time.monotonic() - t0 < budget_s:
        print(f"[throughput] load {seen[-1]:.1f} > {max_load}: waiting", flush=True)
        time.sleep(poll_s)
        seen.append(os.getloadavg()[0])
    return {"waited_s": round(time.monotonic() - t0), "load_seen": [round(x, 2) for x in seen],
            "load_ok": seen[-1] <= max_load}


def _throughput_worker(rank, world, a):
    import torch.distributed as dist

    from megatron_lite.distributed import comm
    models = {v: Variant(a, v, rank) for v in VARIANTS}
    for m in models.values():  # warm-up, untimed: allocator, first buckets, gloo pairs
        for _ in range(a.warmup):
            m.step()
    seconds = {v: [] for v in VARIANTS}
    waits = {v: [] for v in VARIANTS}  # per round: {kind: seconds blocked per step}
    loads = []
    for name in alternate(VARIANTS, a.rounds):
        stats = comm.CommStats()
        dist.barrier()  # start together: a step includes waiting for the slower rank
        loads.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        with stats.recording():
            for _ in range(a.steps):
                models[name].step()
        seconds[name].append((time.perf_counter() - t0) / a.steps)
        waits[name].append({k: s / a.steps for k, s in stats.wait_seconds.items()})
    everyone = [None] * world
    dist.all_gather_object(everyone, {"seconds": seconds, "waits": waits, "loads": loads})
    return everyone


def summarize_throughput(everyone: list[dict], tokens_per_step: int) -> dict:
    """Per variant: seconds per step per round (the slowest rank's), median tokens/s, its ratio to
    cp1_dp2, and each rank's median seconds blocked per step by op kind, and the exposed share."""
    rounds = len(everyone[0]["seconds"][VARIANTS[0]])
    sec = {v: [max(r["seconds"][v][i] for r in everyone) for i in range(rounds)] for v in VARIANTS}
    tps = {v: tokens_per_step / statistics.median(s) for v, s in sec.items()}
    out = {}
    for v in VARIANTS:
        kinds = sorted({k for r in everyone for w in r["waits"][v] for k in w})
        by_kind = [{k: round(statistics.median(w.get(k, 0.0) for w in r["waits"][v]), 4) for k in kinds}
                   for r in everyone]
        step = statistics.median(sec[v])
        out[v] = {"seconds_per_step": [round(s, 4) for s in sec[v]], "tokens_per_s": round(tps[v], 1),
                  "ratio_to_cp1": round(tps[v] / tps["cp1_dp2"], 3),
                  "exposed_seconds_by_kind": by_kind,
                  "exposed_share_per_rank": [round(sum(k.values()) / step, 3) for k in by_kind]}
    return out


# ---------------------------------------------------------------------------------------------------
# report


def _size(row: dict) -> int:
    return DTYPES[row["dtype"]].itemsize


def _mib(n) -> str:
    return "?" if n is None else f"{n / 2**20:.2f}"


def _machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _commit() -> str:
    """HEAD's short hash, '+changes' when this script differs from HEAD's (others commit meanwhile:
    the hash names a tree whose copy of this script ran, when it is clean)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", __file__], cwd=ROOT).returncode != 0
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def memory_section(mem: dict) -> list[str]:
    s = mem["shape"]
    body = [
        f"### Activation memory per rank, seq {s['seq']} ({mem['command']}, commit {mem['commit']})", "",
        f"Llama-like GPT: {s['layers']} layers x {s['hidden']} wide, {s['heads']} heads, {s['kv_heads']} kv "
        f"heads (GQA), SwiGLU, RMSNorm, RoPE, vocab {s['vocab']}; micro-batch 1, weights in the dtype (no "
        f"autocast); one training forward on each of cp gloo ranks. MiB that the fullest rank saves for "
        f"backward (distinct storages, weights excluded), by class (the script's docstring); ratio = "
        f"bytes / the same dtype's cp=1; x cp = ratio x cp (1.00: falls exactly as 1/cp; the claim, on "
        f"the per-token bytes, is within {TOLERANCE:.0%}). Peak RSS: VmHWM above the RSS before the "
        f"forward, for the forward and for the whole forward + backward"
        + (f" (1-minute load {mem['load'][0]} -> {mem['load'][1]}; the bytes do not depend on it)."
           if "load" in mem else "."), "",
        "| dtype | cp | algorithm | per-token | loss dW | mask (bool) | mask (SDPA float copies) "
        "| gathered K/V | ring K/V copies | total | per-token ratio | per-token x cp | total ratio "
        "| total x cp | peak RSS fwd | peak RSS step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in mem["rows"]:
        b = r["bytes"]
        ok = "" if r["cp"] == 1 else (" ✓" if r["per_token_within"] else " ✗")
        body.append(
            f"| {r['dtype']} | {r['cp']} | {r['algorithm']} | {_mib(b['per_token'])} | "
            f"{_mib(b['loss_dw'])} | {_mib(b['mask'])} | "
            f"{_mib(b['mask_float'])} ({r['storages']['mask_float']}) | "
            f"{_mib(b['gathered_kv'])} | {_mib(b['ring_kv'])} | **{_mib(r['total'])}** | "
            f"{r['per_token_ratio']:.3f} | **{r['per_token_scaled']:.3f}**{ok} | {r['total_ratio']:.3f} | "
            f"{r['total_scaled']:.3f} | {_mib(r.get('peak_rss_fwd'))} | {_mib(r.get('peak_rss_step'))} |")
    body += ["", reading(mem)]
    return body


def reading(mem: dict) -> str:
    """What the memory table says, from its numbers: which classes scale and which do not."""
    s, rows = mem["shape"], mem["rows"]
    cp_rows = [r for r in rows if r["cp"] > 1]
    if not cp_rows:
        return ""
    worst = max(cp_rows, key=lambda r: abs(r["per_token_scaled"] - 1))
    misses = [r for r in cp_rows if not r["per_token_within"]]
    if misses:
        verdict = f"Per-token activations miss 1/cp by more than {TOLERANCE:.0%} in: " + ", ".join(
            f"{r['dtype']} cp={r['cp']} {r['algorithm']} (x cp = {r['per_token_scaled']:.3f})"
            for r in misses) + "."
    else:
        verdict = (f"Per-token activations fall as 1/cp within {TOLERANCE:.0%} in every row (furthest: "
                   f"{worst['dtype']} cp={worst['cp']} {worst['algorithm']}, x cp = "
                   f"{worst['per_token_scaled']:.3f}).")
    L, K, D = s["layers"], s["kv_heads"], s["hidden"] // s["heads"]
    has = {c: max(r["bytes"][c] for r in cp_rows) > 0 for c in CLASSES}
    said = [verdict, "What the cp=1 run does not keep (causal SDPA, no mask) and cp adds:"]
    if has["mask"]:
        said.append("the ContextShard's bool mask, T/cp x T, one storage for all layers (it falls as 1/cp, "
                    "but is new);")
    copies = max(r["storages"]["mask_float"] for r in cp_rows)
    where = "/".join(sorted({r["algorithm"] for r in cp_rows if r["bytes"]["mask_float"]}))
    if copies > 1:
        said.append(f"under {where}, SDPA's float copy of the mask, which the CPU flash kernel makes from "
                    f"a bool mask in every layer and saves ({copies} copies of T/cp x T elements in the "
                    f"model's dtype, 4 or 2 times the bool's bytes each; a float mask built once per "
                    f"forward would be saved once);")
    elif copies == 1:
        said.append(f"under {where}, the additive float mask, T/cp x T in the model's dtype, built once per "
                    f"forward and saved once for all layers;")
    if has["gathered_kv"]:
        said.append(f"allgather's gathered K and V, 2 x {K} kv heads x T x {D} per layer whatever cp is "
                    f"(small thanks to GQA: the one term that does not fall with cp at all);")
    if has["ring_kv"]:
        said.append(f"the ring's own contiguous copies of the local K and V (ring_attention's "
                    f"k.contiguous(), v.contiguous(), saved although q's view already keeps the fused qkv "
                    f"output that holds them: 2 x {K} x {D} elements per token per layer, falling as 1/cp);")
    if len(said) > 2:  # the last term ends the sentence
        said[-1] = said[-1].rstrip(";") + "."
    else:  # nothing cp-specific was saved: drop the sentence's opening
        said.pop()
    # The ring's per-token bytes above allgather's, in units of one (T/cp, C) tensor per layer
    pairs = [(g, r) for g in cp_rows for r in cp_rows if g["algorithm"] == "allgather"
             and r["algorithm"] == "ring" and (g["dtype"], g["cp"]) == (r["dtype"], r["cp"])]

    def units(g, r):
        one = L * r["tokens"] * s["hidden"] * _size(r)  # one (T/cp, C) tensor per layer
        return (r["bytes"]["per_token"] - g["bytes"]["per_token"]) / one
    if pairs:
        said.append("The ring's per-token bytes exceed allgather's by " + "; ".join(
            f"{r['dtype']} cp={r['cp']} {_mib(r['bytes']['per_token'] - g['bytes']['per_token'])} MiB = "
            f"{units(g, r):.3f} x L x T/cp x C" for g, r in pairs) + ".")
        if all(abs(units(g, r) - 1) < 0.02 for g, r in pairs):
            said.append("That is one (T/cp, C) tensor per layer: the ring's output is laid out (B, H, T/cp, "
                        "D), so the output projection's input (B, T/cp, H D) is a transposed copy saved "
                        "beside the output the ring keeps, where SDPA's output is laid out (B, T, H, D) and "
                        "the projection's input is a view of it.")
    totals = "; ".join(f"{r['dtype']} cp={r['cp']} {r['algorithm']} {r['total_scaled']:.2f}" for r in cp_rows)
    said.append(f"The loss's dW (V x C, computed in the forward) is the same on every rank whatever cp is. "
                f"Total x cp (1.00 = 1/cp): {totals}.")
    base = {r["dtype"]: r for r in rows if r["cp"] == 1}
    if pairs:
        said.append(
            f"Peak RSS is another matter for the ring: its blocks are computed in fp32 with the scores and "
            f"probabilities materialised, {s['heads']} heads x (T/cp)^2 x 4 bytes = "
            f"{_mib(s['heads'] * (s['seq'] // 2) ** 2 * 4)} MiB per tensor at cp=2 (a quarter at cp=4), "
            f"several alive at once in a block's forward and backward, in bf16 as in fp32. Peak RSS of a "
            f"step, ring / allgather / cp=1: " + "; ".join(
                f"{r['dtype']} cp={r['cp']} {_mib(r.get('peak_rss_step'))} / {_mib(g.get('peak_rss_step'))} "
                f"/ {_mib(base[r['dtype']].get('peak_rss_step'))}" for g, r in pairs) + " MiB.")
    return " ".join(said)


def throughput_section(tp: dict) -> list[str]:
    s, res = tp["shape"], tp["results"]
    load = tp["load"]
    names = {"cp1_dp2": "cp=1, dp=2 (a whole sequence per rank)",
             "cp2_allgather": "cp=2 allgather (half of both sequences per rank)",
             "cp2_ring": "cp=2 ring (half of both sequences per rank)"}
    body = [
        f"### Training throughput, seq {s['seq']} on 2 ranks ({tp['command']}, commit {tp['commit']})", "",
        f"The same model, fp32, the same global batch of 2 sequences x {s['seq']} tokens per step in each "
        f"variant (every rank computes {s['seq']} tokens per step, one rank per core, gloo); forward, "
        f"backward and AdamW through the trainer's Layout -> build_stage -> apply_context_parallel -> "
        f"build_backend; {s['rounds']} alternated rounds of {s['steps']} step(s) after {s['warmup']} "
        f"warm-up, the slowest rank's time, median tokens/s. Exposed communication: seconds per step a "
        f"rank sat blocked (comm.CommStats), by op kind, median over rounds, each rank. 1-minute load "
        f"average before timing {load['before']}, during {load['during_min']}-{load['during_max']} "
        f"(waited {load['waited_s']} s for it to fall under {load['max_load']}"
        f"{'' if load['load_ok'] else ', and it did not'}).", "",
        "| variant | tokens/s | ratio to cp=1 | s/step by round | exposed s/step by kind (rank 0; rank 1) "
        "| exposed share (rank 0, 1) |",
        "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = res[v]
        kinds = "; ".join(", ".join(f"{k} {x:.3f}" for k, x in rk.items()) or "none"
                          for rk in r["exposed_seconds_by_kind"])
        body.append(f"| {names[v]} | {r['tokens_per_s']:.0f} | **{r['ratio_to_cp1']:.3f}** | "
                    f"{', '.join(f'{x:.2f}' for x in r['seconds_per_step'])} | {kinds} | "
                    f"{', '.join(f'{x:.2f}' for x in r['exposed_share_per_rank'])} |")
    most = max(x for v in VARIANTS for x in res[v]["exposed_share_per_rank"])
    spread = {v: max(res[v]["seconds_per_step"]) / min(res[v]["seconds_per_step"]) for v in VARIANTS}
    body += ["", (
        "Why cp=1 is the one to beat on this CPU: at the same tokens per rank, dp=2's causal SDPA skips "
        "the masked half of the scores, while under cp=2 every rank's queries meet keys from both ends of "
        "the sequence: allgather's SDPA takes the T/cp x T mask and computes every score, the ring "
        "computes each partly masked T/cp x T/cp block whole: twice the attention arithmetic of dp=2. "
        "The ring is slower again than allgather at the same arithmetic because its block is not a fused "
        "kernel: fp32 matmuls and elementwise passes (mask, exp, merge; in backward the probabilities "
        "recomputed) over materialised (B, H, T/cp, T/cp) tensors, where SDPA's CPU flash kernel works "
        "tile by tile in cache. "
        + ("Communication is not what costs: " if most < 0.15 else "Communication costs too: ")
        + f"the most any rank of any variant sat blocked is {most:.0%} of its step (p2p is the ring's "
        "K/V and dK/dV messages, nothing else sends p2p here; all_gather and reduce_scatter are "
        "allgather's K/V and dK/dV; all_reduce the gradients' mean over dp x cp; the ranks' shares "
        "differ because one waits for the other's compute, 2 ranks sharing 2 cores with the other "
        "processes on the machine). Context parallelism buys memory here (the table above), not speed, "
        "at a sequence that fits one rank. Slowest / fastest round: "
        + ", ".join(f"{v} {x:.2f}x" for v, x in spread.items())
        + " (the machine is shared: the alternation spreads that over the variants, the median keeps "
        "the middle).")]
    return body


def section(result: dict) -> str:
    body = ["## Context parallelism (`benchmarks/bench_context.py`)", "",
            f"Issue 16's measurements of `parallel.cp` on {result['machine']}."]
    if "memory" in result:
        body += [""] + memory_section(result["memory"])
    if "throughput" in result:
        body += [""] + throughput_section(result["throughput"])
    return "\n".join(body)


# ---------------------------------------------------------------------------------------------------


def _command(a) -> str:
    args = " ".join(sys.argv[1:])
    return f"`python benchmarks/bench_context.py{' ' + args if args else ''}`"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run at small sizes; writes only --out if given, never the docs")
    p.add_argument("--only", choices=("memory", "throughput"),
                   help="run one part; the other is kept from --out's JSON")
    p.add_argument("--render", action="store_true",
                   help="run nothing: rewrite the docs section from --out's JSON")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--mem-seq", type=int, default=8192)
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--tp-seq", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-load", type=float, default=3.0)
    p.add_argument("--wait-load-s", type=float, default=1200.0)
    p.add_argument("--out", default=None,
                   help="the JSON (default benchmarks/results/context.json; --quick: none)")
    a = p.parse_args()
    if a.quick:
        a.layers, a.hidden, a.vocab, a.mem_seq, a.cps, a.dtypes = 2, 64, 384, 256, [1, 2], ["fp32"]
        a.tp_seq, a.rounds, a.warmup, a.wait_load_s = 128, 2, 1, 0
    if any(a.vocab == a.mem_seq // cp for cp in a.cps):  # classify() tells the loss's dW by its shape
        p.error(f"--vocab {a.vocab} equals a rank's token count (--mem-seq / cp): choose another")
    out = a.out or (None if a.quick else str(ROOT / "benchmarks/results/context.json"))
    if a.render:
        write_section(ROOT / "docs/benchmarks.md", "context", section(json.loads(Path(out).read_text())))
        return
    old = json.loads(Path(out).read_text()) if a.only and out and Path(out).exists() else {}
    result = {"machine": _machine(), "model": model_fields(a)}
    shape = {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads,
             "vocab": a.vocab}

    if a.only in (None, "memory"):
        load = os.getloadavg()[0]  # saved bytes do not depend on it; recorded all the same
        rows = memory_rows(a)
        result["memory"] = {"shape": {**shape, "seq": a.mem_seq, "batch": 1}, "rows": rows,
                            "load": [round(load, 2), round(os.getloadavg()[0], 2)],
                            "command": _command(a), "commit": _commit()}
    elif "memory" in old:
        result["memory"] = old["memory"]

    if a.only in (None, "throughput"):
        waited = wait_for_load(a.max_load, a.wait_load_s)
        before = os.getloadavg()[0]
        from megatron_lite.testing import spawn_json
        everyone = spawn_json(_throughput_worker, 2, a)
        loads = everyone[0]["loads"]
        result["throughput"] = {
            "shape": {**shape, "seq": a.tp_seq, "global_batch": 2, "rounds": a.rounds, "steps": a.steps,
                      "warmup": a.warmup},
            "results": summarize_throughput(everyone, 2 * a.tp_seq), "raw": everyone,
            "load": {"before": round(before, 2), "during_min": round(min(loads), 2),
                     "during_max": round(max(loads), 2), "max_load": a.max_load, **waited},
            "command": _command(a), "commit": _commit()}
        for v, r in result["throughput"]["results"].items():
            print(f"[throughput] {v}: {r['tokens_per_s']:.0f} tokens/s, ratio {r['ratio_to_cp1']:.3f}, "
                  f"exposed {r['exposed_seconds_by_kind']}", flush=True)
    elif "throughput" in old:
        result["throughput"] = old["throughput"]

    text = section(result)
    if out:
        write_json(out, result)
    if a.quick:
        print(text)
    else:
        write_section(ROOT / "docs/benchmarks.md", "context", text)
        print(f"wrote {out} and the context section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
