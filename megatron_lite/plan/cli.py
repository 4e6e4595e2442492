"""`megatron-lite plan`: its sub-parser and command. Building the parser imports nothing heavy (the
rest of the package, and torch, load when the command runs)."""

from __future__ import annotations

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
    n.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of GPU memory kept free (CUDA context, allocator fragmentation)")
    n.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_layers=40")
    n.set_defaults(func=cmd_plan)


def cmd_plan(args) -> None:
    from ..config import Config
    from .cluster import Cluster
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
    path = resolve_config(args.config)
    cfg = Config.from_yaml(path, args.overrides)
    cluster = Cluster.preset(args.cluster, args.nodes, gpus_per_node=args.gpus_per_node,
                             gpu_memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops,
                             hbm_gbps=args.hbm_gbps, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                             intra_latency_us=args.intra_latency_us, inter_latency_us=args.inter_latency_us)
    result = plan(cfg, cluster, args.global_batch, seq=args.seq, recompute=tuple(args.recompute),
                  headroom=args.headroom, micro_batch_sizes=tuple(args.micro_batch_sizes),
                  schedules=tuple(args.schedules), max_virtual_stages=args.max_virtual_stages,
                  zero=tuple(ZERO_NAMES[z] for z in args.zero))
    print(format_table(result, args.top, str(path)))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}: every ranked layout with its memory and time breakdown")


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
