"""`megatron-lite plan`: its sub-parser and command. Building the parser imports nothing heavy (the
rest of the package, and torch, load when the command runs)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import ConfigError, UsageError


def add_parser(subparsers) -> None:
    n = subparsers.add_parser("plan", help="rank the valid parallel layouts of a model on a cluster by "
                                           "predicted throughput, among those that fit GPU memory")
    n.add_argument("--config", required=True,
                   help="YAML config or a preset name (gpt2-125m, gpt-1.3b, llama2-7b)")
    n.add_argument("--cluster", default="a100-80gb", help="preset: a100-80gb (DGX A100) or h100 (DGX H100)")
    n.add_argument("--nodes", type=int, default=1)
    n.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    n.add_argument("--seq", type=int, help="sequence length (default: the config's)")
    for flag, kind, what in (("--gpus-per-node", int, "GPUs per node"),
                             ("--gpu-memory-gb", float, "GB per GPU"),
                             ("--peak-tflops", float, "dense bf16 TFLOP/s per GPU"),
                             ("--fp32-tflops", float, "fp32 TFLOP/s per GPU without tensor cores"),
                             ("--hbm-gbps", float, "GPU memory bandwidth, GB/s"),
                             ("--intra-gbps", float, "NVLink GB/s per GPU and direction"),
                             ("--inter-gbps", float, "InfiniBand GB/s per node (all NICs)"),
                             ("--intra-latency-us", float, "intra-node message latency"),
                             ("--inter-latency-us", float, "inter-node message latency")):
        n.add_argument(flag, type=kind, help=f"override the preset's {what}")
    n.add_argument("--top", type=int, default=10, help="rows to print")
    n.add_argument("--json", metavar="OUT", help="write every ranked layout (memory and time breakdown) here")
    n.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    n.add_argument("--schedules", nargs="+", default=["1f1b", "interleaved"],
                   choices=["gpipe", "1f1b", "interleaved"])
    n.add_argument("--max-virtual-stages", type=int, default=4, help="largest v tried with interleaving")
    n.add_argument("--zero", nargs="+", default=["0", "1", "2", "3"],
                   help="ZeRO variants: 0, 1, 2, 3 (native), ds1, ds2, ds3 (DeepSpeed)")
    n.add_argument("--recompute", nargs="+", default=["none", "selective", "full"],
                   choices=["none", "selective", "full"])
    n.add_argument("--profile", default="ours", choices=["ours", "megatron-2021"],
                   help="time model: ours (this code, dp collectives overlapped as parallel.overlap_* ask) "
                        "or megatron-2021 (Megatron-LM as in arXiv 2104.04473: nothing overlapped)")
    # pin a dimension instead of enumerating it
    for flag, what in (("--tp", "tensor-parallel size"), ("--pp", "pipeline stages"),
                       ("--dp", "data-parallel size"),
                       ("--cp", "context-parallel size (default: each size that leaves every cp rank "
                                "at least 4096 tokens)"),
                       ("--ep", "expert-parallel size of a MoE model (default: every one dividing dp x cp "
                                "and the experts)"),
                       ("--virtual-stages", "interleaved virtual stages per rank"),
                       ("--micro-batch", "micro-batch size (one of --micro-batch-sizes)")):
        n.add_argument(flag, type=int, help=f"pin the {what}")
    n.add_argument("--cp-algorithm", choices=["allgather", "ring"],
                   help="pin the context-parallel algorithm (default: both where cp > 1)")
    n.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                   help="pin sequence parallelism on (--sp) or off (--no-sp); default: on where allowed")
    n.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved"], help="pin the pipeline schedule")
    n.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of GPU memory kept free (CUDA context, allocator fragmentation)")
    n.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_layers=40")
    n.set_defaults(func=cmd_plan)


def cmd_plan(args) -> None:
    from ..config import Config
    from .cluster import PROFILES, Cluster
    from .report import format_table, write_json
    from .search import ZERO_NAMES, plan
    if args.top < 1:
        raise UsageError(f"--top={args.top} must be >= 1.")
    if not 0 <= args.headroom < 1:
        raise UsageError(f"--headroom={args.headroom} must be in [0, 1).")
    bad = [z for z in args.zero if z not in ZERO_NAMES]
    if bad:
        raise UsageError(f"--zero {bad[0]!r} is not a ZeRO variant; choose from {', '.join(ZERO_NAMES)}.")
    if any(b < 1 for b in args.micro_batch_sizes):
        raise UsageError(f"--micro-batch-sizes {args.micro_batch_sizes} must all be >= 1.")
    pins = pinned(args)
    path = resolve_config(args.config)
    cfg = Config.from_yaml(path, args.overrides)
    cluster = Cluster.preset(args.cluster, args.nodes, gpus_per_node=args.gpus_per_node,
                             gpu_memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops,
                             fp32_tflops=args.fp32_tflops,
                             hbm_gbps=args.hbm_gbps, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                             intra_latency_us=args.intra_latency_us, inter_latency_us=args.inter_latency_us)
    check_pins(args, cluster.gpus_per_node, cluster.world_size)
    seq = args.seq or cfg.seq_length
    if args.cp and seq % (2 * args.cp):
        raise UsageError(f"--cp {args.cp} needs a sequence length divisible by 2 x {args.cp} (each cp rank "
                         f"holds two of 2 cp equal chunks), not {seq}; change --seq or --cp.")
    result = plan(cfg, cluster, args.global_batch, seq=args.seq, profile=PROFILES[args.profile],
                  recompute=tuple(args.recompute), headroom=args.headroom,
                  micro_batch_sizes=tuple(args.micro_batch_sizes), schedules=tuple(args.schedules),
                  max_virtual_stages=args.max_virtual_stages, zero=tuple(ZERO_NAMES[z] for z in args.zero),
                  **pins)
    print(format_table(result, args.top, str(path)))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}: every ranked layout with its memory and time breakdown")


def pinned(args) -> dict:
    """The pinning flags as plan()'s enumeration arguments (and --micro-batch / --schedule /
    --virtual-stages folded into the lists they narrow)."""
    for flag in ("tp", "pp", "dp", "cp", "virtual_stages", "micro_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')}={value} must be >= 1.")
    v = args.virtual_stages
    if args.schedule:
        if v is not None and v > 1 and args.schedule != "interleaved":
            raise UsageError(f"--virtual-stages {v} needs --schedule interleaved (not {args.schedule}); "
                             f"drop one of them.")
        args.schedules = [args.schedule]
    elif v is not None and v > 1:
        args.schedules = ["interleaved"]
    if v is not None:
        args.max_virtual_stages = max(args.max_virtual_stages, v)
    if args.micro_batch is not None:
        args.micro_batch_sizes = [args.micro_batch]
    out = {"tp_values": [args.tp] if args.tp else None, "pp_values": [args.pp] if args.pp else None,
           "dp_values": [args.dp] if args.dp else None, "virtual_stages": v,
           "cp_values": [args.cp] if args.cp else None, "ep_values": [args.ep] if args.ep else None}
    if args.cp_algorithm:
        out["cp_algorithms"] = (args.cp_algorithm,)
    if args.sp is not None:
        out["sequence_parallel"] = "on" if args.sp else "off"
    return out


def check_pins(args, gpus_per_node: int, world: int) -> None:
    """The pinned sizes against the cluster, each refused in one sentence naming the fix."""
    if args.tp and gpus_per_node % args.tp:
        raise UsageError(f"--tp {args.tp} does not divide the {gpus_per_node} GPUs of a node; plan keeps "
                         f"tensor parallelism within a node, so pick a divisor of {gpus_per_node}.")
    if args.sp and args.tp == 1:
        raise UsageError("--sp needs --tp > 1 (sequence parallelism splits the sequence over the tp ranks).")
    sizes = (("tp", args.tp), ("cp", args.cp), ("pp", args.pp), ("dp", args.dp))
    pins = [(f"--{flag}", x) for flag, x in sizes if x]
    named = " x ".join(f"{flag} {x}" for flag, x in pins)
    product = math.prod(x for _, x in pins)
    # tp, pp and dp all pinned leave cp nothing to fill: cp is 1 unless --cp says otherwise
    if args.tp and args.pp and args.dp and product != world:
        raise UsageError(f"{named} = {product} but the cluster has {world} GPUs; make the product equal it "
                         f"(or change --nodes).")
    if world % product:
        raise UsageError(f"{named} does not divide the cluster's {world} GPUs; pick sizes whose product "
                         f"divides it (or change --nodes).")


def resolve_config(name: str) -> Path:
    """A YAML path, or the name of a preset in configs/ (gpt2-125m, gpt-1.3b, llama2-7b, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    presets = Path(__file__).resolve().parents[2] / "configs"
    for cand in (presets / name, presets / f"{name}.yaml"):
        if cand.is_file():
            return cand
    known = sorted(p.stem for p in presets.glob("*.yaml")) if presets.is_dir() else []
    raise ConfigError(f"--config {name!r} is neither a file nor a preset; pass a YAML path or one of "
                      f"{', '.join(known) or 'the configs/ presets'}.")
