"""Our training against torch's own implementations, side by side in one run (issue 20, item 4).

Pairs, each at the same GPT shape, the same global batch and AdamW (torch's, fused where torch has
the kernel, both sides), with the same gradient-norm clipping (ours always computes the norm for
its non-finite policy; the peers clip at the same max norm), runs alternated ours / peer / ours /
peer so machine drift hits both; ratio = median ours tokens/s / median peer tokens/s:

  dp    our dp=2 (native backend: build_backend -> LocalBackend) vs torch DistributedDataParallel
        over our serial GPT; ours twice, with parallel.overlap_grad_reduce on (the default) and off
  zero3 our native ZeRO-3 dp=2 (optim.zero.stage=3) vs FSDP2 fully_shard (each block, then the root)
  pp    our pp=2 1F1B vs torch.distributed.pipelining Schedule1F1B over our model cut into two stage
        modules (its "manual splitting": each rank keeps its half); untied embeddings on both sides
        (a tied pair across stages needs a sync step torch's schedule does not have)
  single one process: our GPT vs nanoGPT's model (benchmarks/nanogpt_model.py, vendored, MIT) at
        vocab 8192 and 50257, fp32, GPT-2 architecture (learned positions, LayerNorm, exact-erf
        GELU as nanoGPT's nn.GELU, tied embeddings, biases)

The multi-process pairs run on 2 gloo ranks twice: (a) one node, over loopback, (b) two "nodes",
network namespaces joined by a veth pair whose two ends are throttled with netem (rate, delay), so
communication is a real share of the step. Our code is driven through its public build path
(Config -> Layout -> build_stage -> build_backend), so whatever the backend does (e.g. the
overlapped gradient reduction) is what is measured. For ours, CommStats (distributed/comm.py)
records the seconds the rank sat blocked on communication: exposed share = exposed seconds / step
seconds (the mean over ranks). Writes benchmarks/results/peers.json and the "peers" section of
docs/benchmarks.md. Needs root for (b) (namespaces, tc); skipped otherwise.

    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py            # the full run (~20 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --quick    # smoke run (~3 min), records nothing
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --only single --vocabs 8192   # rerun one part
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402

PAIRS = ("dp", "zero3", "pp")
PARTS = ("single", "one_node", "two_nodes")  # what --only selects
# The variants each pair times, ours first; the ratio is each "ours*" over the peer.
# ours_small_buckets: the default bucket (40M elements, Megatron's) holds this whole model, so its one
# reduction can only start once the backward is done; smaller buckets let the overlap show
# ours_zero1: the distributed optimizer (Megatron's --use-distributed-optimizer) at the small buckets:
# a reduce-scatter (half an all-reduce's bytes at dp=2) in the backward, and the updated weights'
# all-gather overlapped with the next forward
VARIANTS = {"dp": ("ours", "ours_small_buckets", "ours_zero1", "ours_no_overlap", "ddp"),
            "zero3": ("ours", "fsdp2"),
            "pp": ("ours", "pipelining")}
GRAD_CLIP = 1.0


def ratio(ours: list[float], peer: list[float]) -> float:
    """Median tokens/s of ours over the peer's, from seconds per step (same tokens per step)."""
    return statistics.median(peer) / statistics.median(ours)


def alternate(names, rounds: int):
    """The run order: each round all variants, every other round reversed, so a slow stretch of the
    machine lands on every variant alike."""
    for r in range(rounds):
        yield from (names if r % 2 == 0 else tuple(reversed(names)))


# ---------------------------------------------------------------------------------------------------
# multi-process: one torchrun worker per rank


def our_config(a, pair: str, overlap: bool = True, bucket: int | None = None, zero: int = 0):
    from megatron_lite.config import Config
    over = [f"model.vocab_size={a.mp_vocab}", f"model.hidden_size={a.mp_hidden}",
            f"model.num_layers={a.mp_layers}", f"model.num_attention_heads={a.mp_heads}",
            f"model.max_sequence_length={a.mp_seq}", "model.activation=gelu_exact",
            "parallel.make_vocab_divisible_by=1", f"optim.grad_clip={GRAD_CLIP}", "train.device=cpu",
            f"parallel.overlap_grad_reduce={str(overlap).lower()}"]
    if bucket:
        over.append(f"optim.zero.bucket_elements={bucket}")
    if pair == "pp":
        # m micro-batches of global/m through the pipeline; no dp
        over += ["parallel.pp=2", "parallel.schedule=1f1b", f"parallel.microbatches={a.pp_micro}",
                 f"data.micro_batch_size={a.mp_batch // a.pp_micro}", "model.tie_embeddings=false"]
    else:
        over += ["parallel.dp=2", f"data.micro_batch_size={a.mp_batch // 2}",
                 f"optim.zero.stage={3 if pair == 'zero3' else zero}"]
    return Config.from_yaml(None, over)


class Ours:
    """Our backend for this rank, built the way the trainer builds it."""

    def __init__(self, a, pair: str, groups_cache: dict, overlap: bool = True, bucket: int | None = None,
                 zero: int = 0):
        from megatron_lite.distributed import comm
        from megatron_lite.layout import Layout
        from megatron_lite.parallel.tensor_parallel import build_stage
        from megatron_lite.train.backends import build_backend
        cfg = our_config(a, pair, overlap, bucket, zero)
        layout = Layout.build(cfg, 2)
        rank = comm.rank(comm.world())
        key = (layout.dp, layout.pp)
        if key not in groups_cache:  # new_group is collective: build each layout's groups once
            groups_cache[key] = layout.topology.build(rank)
        groups = groups_cache[key]
        chunks = layout.chunks(groups.coord.pp)
        self.model, _ = build_stage(cfg.model, cfg.train.seed, [i for c in chunks for i in c.layers],
                                    any(c.first for c in chunks), any(c.last for c in chunks),
                                    torch.device("cpu"), None)
        self.backend = build_backend(layout, self.model, groups, torch.device("cpu"), contextlib.nullcontext)
        self.lr = cfg.optim.lr

    def step(self, batches) -> None:
        loss = self.backend.forward_backward(batches)
        self.backend.step(self.lr, loss)


def _adamw(groups, cfg):
    """The peers' AdamW: torch's, built as ours is (optim/adamw.py: fused where torch has the kernel),
    so the pairs differ in their parallel code only."""
    from megatron_lite.optim.adamw import make_adamw
    return make_adamw(groups, cfg.optim)


def _groups(model, weight_decay: float):
    """AdamW groups as ours makes them (optim.param_groups): decay matrices, not norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class DDPPeer:
    def __init__(self, a, cfg):
        from torch.nn.parallel import DistributedDataParallel

        from megatron_lite.model import GPT
        self.model = DistributedDataParallel(GPT(cfg.model, seed=cfg.train.seed))
        self.opt = _adamw(_groups(self.model, cfg.optim.weight_decay), cfg)

    def step(self, batches) -> None:
        (x, y), = batches
        self.model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class FSDPPeer:
    def __init__(self, a, cfg):
        from torch.distributed.fsdp import fully_shard

        from megatron_lite.model import GPT
        model = GPT(cfg.model, seed=cfg.train.seed)
        for block in model.blocks.values():  # one all-gather / reduce-scatter unit per block
            fully_shard(block)
        self.model = fully_shard(model)  # the root: embeddings, final norm, head
        self.opt = _adamw(_groups(model, cfg.optim.weight_decay), cfg)

    def step(self, batches) -> None:
        (x, y), = batches
        self.model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)  # DTensor: a global norm
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class _Half(torch.nn.Module):
    """One pipeline stage of our GPT for torch.distributed.pipelining: the first half embeds and
    runs its blocks; the second runs its blocks and the final norm, and its loss_fn applies our
    fused linear + cross-entropy with its lm_head weight (the same head ours runs)."""

    def __init__(self, gpt, layers, first: bool):
        super().__init__()
        self.gpt, self.layers, self.first = gpt, layers, first

    def forward(self, x):
        if self.first:
            x = self.gpt.embed(x)  # (B, T, C)
        for i in self.layers:
            x = self.gpt.run_block(i, x)  # (B, T, C)
        return x if self.first else self.gpt.ln_f(x)  # (B, T, C)


class PipePeer:
    def __init__(self, a, cfg):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        from megatron_lite.distributed import comm
        from megatron_lite.model import GPT
        from megatron_lite.model.loss import linear_cross_entropy
        self.rank = comm.rank(comm.world())
        L = cfg.model.num_layers
        layers = list(range(L // 2)) if self.rank == 0 else list(range(L // 2, L))
        # the documented manual split: each rank builds only its part of the model
        gpt = GPT(cfg.model, seed=cfg.train.seed, layers=layers, embed=self.rank == 0, head=self.rank == 1)
        self.module = _Half(gpt, layers, first=self.rank == 0)
        # the micro-batch's input and output, given: the stages then skip torch's runtime shape
        # inference (a forward and backward of a micro-batch at the first step)
        b, T, C = a.mp_batch // a.pp_micro, a.mp_seq, cfg.model.hidden_size
        hidden = torch.empty(b, T, C, requires_grad=True)  # activations: their gradient travels back
        first_in = torch.zeros(b, T, dtype=torch.long) if self.rank == 0 else hidden
        self.stage = PipelineStage(self.module, self.rank, 2, torch.device("cpu"), input_args=(first_in,),
                                   output_args=(hidden,))

        def loss_fn(h, y):  # h (b, T, C) after ln_f, y (b, T)
            return linear_cross_entropy(h.flatten(0, 1), gpt.lm_head.weight, y.flatten())

        # every rank passes loss_fn: it is how the schedule knows it runs a backward at all
        self.schedule = Schedule1F1B(self.stage, a.pp_micro, loss_fn=loss_fn)
        self.opt = _adamw(_groups(self.module, cfg.optim.weight_decay), cfg)

    def step(self, batches) -> None:
        import torch.distributed as dist
        x = torch.cat([b[0] for b in batches])  # the global batch; the schedule cuts it in m
        y = torch.cat([b[1] for b in batches])
        if self.rank == 0:
            self.schedule.step(x)
        else:
            self.schedule.step(target=y, losses=[])
        # the global norm over both stages, clipped as ours and torch's clip_grad_norm_ do
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        sq = torch.stack([g.pow(2).sum() for g in grads]).sum()
        dist.all_reduce(sq)
        coef = GRAD_CLIP / (sq.sqrt() + 1e-6)
        if coef < 1:
            torch._foreach_mul_(grads, coef)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _batches(a, pair: str, rank: int):
    """This rank's micro-batches of one global batch of a.mp_batch sequences (random ids)."""
    g = torch.Generator().manual_seed(rank)
    if pair == "pp":
        n, b = a.pp_micro, a.mp_batch // a.pp_micro
    else:
        n, b = 1, a.mp_batch // 2
    ids = torch.randint(0, a.mp_vocab, (n, b, a.mp_seq + 1), generator=g)
    return [(i[:, :-1].contiguous(), i[:, 1:].contiguous()) for i in ids]


def worker(a) -> None:
    """One rank (under torchrun): every pair, its variants alternated; rank 0 writes the JSON."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_lite.distributed import comm
    from megatron_lite.distributed.env import RunEnv
    comm.init(torch.device("cpu"), RunEnv.from_environ(), timeout_s=600)
    rank = comm.rank(comm.world())
    groups_cache: dict = {}
    out = {}
    for pair in PAIRS:
        cfg = our_config(a, pair)
        models = {}
        for name in VARIANTS[pair]:
            if name.startswith("ours"):
                models[name] = Ours(a, pair, groups_cache, overlap=name != "ours_no_overlap",
                                    bucket=a.small_bucket if name in ("ours_small_buckets", "ours_zero1")
                                    else None, zero=1 if name == "ours_zero1" else 0)
            else:
                models[name] = {"ddp": DDPPeer, "fsdp2": FSDPPeer, "pipelining": PipePeer}[name](a, cfg)
        batches = _batches(a, pair, rank)
        for m in models.values():  # warm-up, excluded from the timings: allocator, first buckets
            for _ in range(a.warmup):
                m.step(batches)
        seconds = {n: [] for n in models}
        exposed = {n: [] for n in models if n.startswith("ours")}
        by_kind = {n: {} for n in exposed}
        for name in alternate(tuple(models), a.rounds):
            stats = comm.CommStats()
            dist.barrier()  # start together: a rank's step time includes waiting for the slower one
            t0 = time.perf_counter()
            with stats.recording() if name in exposed else contextlib.nullcontext():
                for _ in range(a.steps):
                    models[name].step(batches)
            dt = (time.perf_counter() - t0) / a.steps
            seconds[name].append(dt)
            if name in exposed:
                exposed[name].append(stats.exposed_seconds() / a.steps)
                for k, v in stats.wait_seconds.items():
                    by_kind[name][k] = by_kind[name].get(k, 0.0) + v / a.steps / a.rounds
        # every rank's view: a step ends on the slowest rank, so take the max seconds over ranks
        mine = {"seconds": seconds, "exposed": exposed, "by_kind": by_kind}
        everyone = comm.all_gather_object(mine, comm.world())
        if rank == 0:
            sec = {n: [max(r["seconds"][n][i] for r in everyone) for i in range(a.rounds)] for n in models}
            exp = {n: [r["exposed"][n] for r in everyone] for n in exposed}
            out[pair] = {
                "seconds_per_step": {n: [round(t, 4) for t in v] for n, v in sec.items()},
                "tokens_per_s": {n: round(a.mp_batch * a.mp_seq / statistics.median(v), 1)
                                 for n, v in sec.items()},
                "ratio": {n: round(ratio(sec[n], sec[VARIANTS[pair][-1]]), 3) for n in exposed},
                # exposed communication over the step, per rank (median over rounds), then the mean
                "exposed_share_per_rank": {n: [round(statistics.median(e) / statistics.median(sec[n]), 3)
                                               for e in exp[n]] for n in exposed},
                "exposed_share": {n: round(statistics.mean(statistics.median(e) for e in exp[n])
                                           / statistics.median(sec[n]), 3) for n in exposed},
                "exposed_seconds_by_kind": {n: [{k: round(v, 4) for k, v in r["by_kind"][n].items()}
                                                for r in everyone] for n in exposed},
            }
            print(f"[{pair}] ratio {json.dumps(out[pair]['ratio'])} exposed "
                  f"{json.dumps(out[pair]['exposed_share'])}", flush=True)
        del models
    if rank == 0:
        Path(a.out_json).write_text(json.dumps(out))
    comm.destroy()


# ---------------------------------------------------------------------------------------------------
# launching the workers: loopback, and two throttled network namespaces


def _worker_argv(a, out_json: str) -> list[str]:
    keep = ["small_bucket", "mp_layers", "mp_hidden", "mp_heads", "mp_seq", "mp_batch", "mp_vocab",
            "pp_micro", "steps", "warmup"]
    return [__file__, "--worker", "--out-json", out_json, "--rounds", str(a.mp_rounds),
            *sum(([f"--{k.replace('_', '-')}", str(getattr(a, k))] for k in keep), [])]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def _env(**extra) -> dict:
    from megatron_lite.distributed.env import child_environ
    return child_environ(OMP_NUM_THREADS="1", **extra)


def run_loopback(a) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        subprocess.run([*_torchrun(), "--standalone", "--nproc_per_node=2", *_worker_argv(a, out)],
                       env=_env(), check=True, timeout=a.timeout)
        return json.loads(Path(out).read_text())


NS = ("mlpeer-a", "mlpeer-b")  # our namespaces, and the veth ends named after them
ADDRS = ("10.213.79.1", "10.213.79.2")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _shape(ns: str, rate: str, delay: str) -> str:
    """Shape the egress of `ns`'s veth end: netem (rate and delay) where the kernel has it, else a
    token bucket (tbf: the rate only; its burst holds a few 64 KB GSO packets of the veth). Returns
    the qdisc used."""
    tc = ["nsenter", f"--net=/run/netns/{ns}", "tc", "qdisc", "add", "dev", ns, "root"]
    netem = [*tc, "netem", "rate", rate, "delay", delay, "limit", "100000"]
    if subprocess.run(netem, capture_output=True).returncode == 0:
        return f"netem rate {rate} delay {delay}"
    subprocess.run([*tc, "tbf", "rate", rate, "burst", "1mb", "latency", "200ms"], check=True)
    return f"tbf rate {rate}"


@contextlib.contextmanager
def throttled_nodes(rate: str, delay: str):
    """Two network namespaces joined by one veth pair, each end's egress shaped (so both directions
    see `rate`); yields the shaping used. Only what this creates is removed afterwards. Processes
    join a namespace with nsenter (as megatron_lite/testing/cluster.py's Cluster.netns_cmd, not
    `ip netns exec`, which remounts /sys)."""
    created: list[str] = []
    try:
        for ns in NS:
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", NS[0], "netns", NS[0], "type", "veth", "peer", "name", NS[1], "netns", NS[1])
        shaping = []
        for ns, addr in zip(NS, ADDRS, strict=True):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns)
            _ip("-n", ns, "link", "set", ns, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            shaping.append(_shape(ns, rate, delay))
        yield shaping[0]
    finally:
        for ns in reversed(created):  # deleting a namespace deletes its veth end (and so the pair)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def two_node_skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    for tool in ("ip", "tc", "nsenter"):
        if not shutil.which(tool):
            return f"{tool} not found"
    return None


def run_two_nodes(a) -> dict:
    with tempfile.TemporaryDirectory() as d, throttled_nodes(a.rate, a.delay) as shaping:
        out = os.path.join(d, "out.json")
        procs = []
        try:
            for i, ns in enumerate(NS):
                argv = ["nsenter", f"--net=/run/netns/{ns}", *_torchrun(), "--nnodes=2", "--nproc_per_node=1",
                        f"--node_rank={i}", f"--master_addr={ADDRS[0]}", "--master_port=29571",
                        *_worker_argv(a, out)]
                # gloo binds to the namespace's veth: the host name resolves to 127.0.0.1 there
                procs.append(subprocess.Popen(argv, env=_env(GLOO_SOCKET_IFNAME=ns)))
            deadline = time.monotonic() + a.timeout
            for p in procs:
                if p.wait(timeout=max(1, deadline - time.monotonic())) != 0:
                    raise RuntimeError(f"two-node worker exited {p.returncode}")
        finally:
            for p in procs:  # only the launchers this started; their workers die with them
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return {"link": shaping, **json.loads(Path(out).read_text())}


# ---------------------------------------------------------------------------------------------------
# single process: our GPT vs nanoGPT's


def single(a, vocab: int) -> dict:
    from benchmarks import nanogpt_model as nano
    from megatron_lite.config import ModelConfig, OptimConfig
    from megatron_lite.model import GPT
    from megatron_lite.optim.adamw import make_adamw
    cfg = ModelConfig(vocab_size=vocab, hidden_size=a.hidden, num_layers=a.layers,
                      num_attention_heads=a.heads, max_sequence_length=a.seq,
                      activation="gelu_exact")  # nanoGPT's nn.GELU() is erf
    models = {"ours": GPT(cfg, seed=0),
              "nanogpt": nano.GPT(nano.GPTConfig(block_size=a.seq, vocab_size=vocab, n_layer=a.layers,
                                                 n_head=a.heads, n_embd=a.hidden, dropout=0.0, bias=True))}
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert len(set(n_params.values())) == 1, n_params  # truly the same shape
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # nanoGPT views its targets: contiguous
    steps = {}
    for name, m in models.items():
        m.train()
        # the same AdamW on both sides, built as our trainer builds it (fused where torch has it)
        opt = make_adamw([{"params": list(m.parameters())}], OptimConfig(lr=1e-4))

        def step(m=m, opt=opt):
            loss = m(x, y)[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[name] = step
    for s in steps.values():
        for _ in range(a.warmup):
            s()
    seconds = {n: [] for n in steps}
    for name in alternate(tuple(steps), a.rounds):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            steps[name]()
        seconds[name].append((time.perf_counter() - t0) / a.steps)
    return {"vocab": vocab, "params": n_params["ours"],
            "seconds_per_step": {n: [round(t, 4) for t in v] for n, v in seconds.items()},
            "tokens_per_s": {n: round(a.batch * a.seq / statistics.median(v), 1) for n, v in seconds.items()},
            "ratio": round(ratio(seconds["ours"], seconds["nanogpt"]), 3)}


# ---------------------------------------------------------------------------------------------------


def commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True,
                       text=True)
    return r.stdout.strip()[:100]


def report(a, result: dict) -> str:
    runs: dict = {}  # (command, commit) -> the parts it produced, in order
    parts = [(f"single process V={s['vocab']}", s) for s in result.get("single", [])]
    parts += [(name, result.get(key)) for name, key in (("one node", "one_node"), ("two nodes", "two_nodes"))]
    for name, part in parts:
        if part:
            runs.setdefault((part.get("command"), part.get("commit")), []).append(name)
    lines = ["; ".join(f"{', '.join(names)}: `{cmd}` at commit `{(sha or '?').split()[0]}`"
                       for (cmd, sha), names in runs.items()) +
             f". torch {result['torch']}, {result['platform']}, CPU only, gloo.", ""]
    if "single" in result:
        lines += [f"**Single process** ({a.threads} threads): {a.layers} layers x {a.hidden} wide, "
                  f"{a.heads} heads, seq {a.seq}, batch {a.batch}, fp32, torch AdamW (fused, both); "
                  f"median of {a.rounds} alternating runs x {a.steps} steps after {a.warmup} warm-up steps "
                  "each.", "",
                  "| vocab | params | ours tokens/s | nanoGPT tokens/s | **ours / nanoGPT** |",
                  "|---|---|---|---|---|"]
        for s in result["single"]:
            lines.append(f"| {s['vocab']} | {s['params'] / 1e6:.1f}M | {s['tokens_per_s']['ours']:,.0f} | "
                         f"{s['tokens_per_s']['nanogpt']:,.0f} | **{s['ratio']:.3f}x** |")
        lines.append("")
    lines += [f"**Two ranks** (1 thread each): {a.mp_layers} layers x {a.mp_hidden} wide, {a.mp_heads} "
              f"heads, seq {a.mp_seq}, vocab {a.mp_vocab}, global batch {a.mp_batch} "
              f"(dp: {a.mp_batch // 2} per rank; "
              f"pp: {a.pp_micro} micro-batches of {a.mp_batch // a.pp_micro}), fp32, grad clip {GRAD_CLIP}; "
              f"median of {a.mp_rounds} alternating runs x {a.steps} steps after {a.warmup} warm-up steps. "
              f"Step time = the slower rank's. Exposed comm = seconds our rank sat blocked waiting for "
              f"communication (CommStats.exposed_seconds) / step, mean over ranks.", "",
              "| pair | ours | peer | network | ours tokens/s | peer tokens/s | **ours / peer** | "
              "exposed comm (ours) |", "|---|---|---|---|---|---|---|---|"]
    names = {("dp", "ours"): "dp=2, overlap_grad_reduce=true",
             ("dp", "ours_small_buckets"): f"dp=2, overlap_grad_reduce=true, buckets of "
                                           f"{a.small_bucket / 1e6:g}M elements",
             ("dp", "ours_zero1"): f"dp=2, distributed optimizer (ZeRO-1), overlap_grad_reduce and "
                                   f"overlap_param_gather, buckets of {a.small_bucket / 1e6:g}M elements",
             ("dp", "ours_no_overlap"):
             "dp=2, overlap_grad_reduce=false", ("zero3", "ours"): "native ZeRO-3 dp=2",
             ("pp", "ours"): "pp=2 1F1B"}
    peers = {"dp": "DDP", "zero3": "FSDP2 fully_shard", "pp": "pipelining Schedule1F1B"}
    two = result.get("two_nodes", {}).get("link", "")
    for net, key in (("one node (loopback)", "one_node"), (f"two netns nodes ({two})", "two_nodes")):
        if key not in result:
            continue
        for pair in PAIRS:
            r = result[key][pair]
            peer = VARIANTS[pair][-1]
            for n in r["ratio"]:
                lines.append(f"| {pair} | {names[(pair, n)]} | {peers[pair]} | {net} | "
                             f"{r['tokens_per_s'][n]:,.0f} | {r['tokens_per_s'][peer]:,.0f} | "
                             f"**{r['ratio'][n]:.3f}x** | {100 * r['exposed_share'][n]:.0f}% |")
    if two.startswith("tbf"):
        lines += ["", "The two-node link is shaped with a token bucket (tbf) at the rate only: this "
                  "kernel has no netem (`tc qdisc add ... netem` fails with \"Specified qdisc kind is "
                  "unknown\"), so no delay was added."]
    if "two_nodes_skipped" in result:
        lines += ["", f"Two-node run skipped: {result['two_nodes_skipped']}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 rounds x 1 step")
    p.add_argument("--only", nargs="+", choices=["single", "one_node", "two_nodes"],
                   default=["single", "one_node", "two_nodes"])
    # single process (bench_throughput's shape)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocabs", type=int, nargs="+", default=[8192, 50257])
    p.add_argument("--threads", type=int, default=2, help="torch threads of the single-process run")
    # two ranks
    p.add_argument("--mp-layers", type=int, default=4)
    p.add_argument("--mp-hidden", type=int, default=256)
    p.add_argument("--mp-heads", type=int, default=4)
    p.add_argument("--mp-seq", type=int, default=128)
    p.add_argument("--mp-batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--mp-vocab", type=int, default=8192)
    p.add_argument("--pp-micro", type=int, default=4, help="pipeline micro-batches per step")
    p.add_argument("--small-bucket", type=int, default=1_000_000,
                   help="optim.zero.bucket_elements of the dp variant ours_small_buckets")
    # 1 Gbit/s: our dp=2 all-after-backward step then waits ~1/3 of its time on the link (400 Mbit/s
    # gave ~55%, loopback ~14%)
    p.add_argument("--rate", default="1gbit", help="netem rate of the two-node link")
    p.add_argument("--delay", default="1ms", help="netem delay of the two-node link (each way)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the single-process pair")
    p.add_argument("--mp-rounds", type=int, default=10,
                   help="alternating rounds of the two-rank pairs (one-node rounds move by +-10%% here)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/peers.json"))
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    if a.quick:
        a.layers, a.hidden, a.heads, a.seq, a.batch = 2, 128, 4, 64, 4
        a.mp_layers, a.mp_hidden, a.mp_seq = 2, 64, 32
        a.rounds, a.mp_rounds, a.steps, a.warmup = 2, 2, 1, 1
    stamp = {"command": " ".join(["python", "benchmarks/bench_peers.py", *sys.argv[1:]]),
             "commit": commit()}
    previous = {}
    if set(a.only) != set(PARTS) and Path(a.out).exists() and not a.quick:
        # a partial rerun (--only): what is not rerun keeps its recorded results, each part (each
        # vocab of the single-process part) naming the command and commit it came from
        previous = json.loads(Path(a.out).read_text())
        old = {"command": previous.get("command"), "commit": previous.get("commit")}
        for part in PARTS:
            if isinstance(previous.get(part), dict):
                previous[part] = {**old, **previous[part]}
        previous["single"] = [{**old, **s} for s in previous.get("single", [])]
    result = {**previous, "benchmark": "ours vs torch DDP / FSDP2 / pipelining, and vs nanoGPT", **stamp,
              "torch": torch.__version__, "platform": platform.platform(),
              "args": {k: v for k, v in vars(a).items() if k not in ("worker", "out_json", "out")}}
    if "single" in a.only:
        torch.set_num_threads(a.threads)
        kept = [s for s in previous.get("single", []) if s["vocab"] not in a.vocabs]
        result["single"] = sorted(kept + [{**single(a, v), **stamp} for v in a.vocabs],
                                  key=lambda s: s["vocab"])
        print(json.dumps(result["single"]), flush=True)
    if "one_node" in a.only:
        result["one_node"] = {**run_loopback(a), **stamp}
    if "two_nodes" in a.only:
        reason = two_node_skip_reason()
        if reason is None:
            result["two_nodes"] = {**run_two_nodes(a), **stamp}
        else:
            result["two_nodes_skipped"] = reason
    table = report(a, result)
    print(table)
    if a.quick:  # a smoke run keeps the recorded results
        return
    write_json(a.out, result)
    write_section(ROOT / "docs/benchmarks.md", "peers", table)


if __name__ == "__main__":
    main()
