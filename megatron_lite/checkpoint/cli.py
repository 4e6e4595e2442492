"""`megatron-lite checkpoint verify|inspect|convert|export|import`: its sub-parsers and commands.
Building the parsers imports nothing heavy (the manager, transformers and torch load when a
command runs)."""

from __future__ import annotations

import os

from ..data.cli import SEPARATOR_HELP

CHECKPOINT_PATH = "run directory, its checkpoints/ or a step_* directory"


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("checkpoint", help="verify, inspect, convert, export or import a checkpoint")
    csub = c.add_subparsers(dest="checkpoint_command", required=True)
    v = csub.add_parser("verify", help="check every file against the manifest's sizes and checksums "
                                       "(exit 2 naming the first damaged file)")
    v.add_argument("path", help=CHECKPOINT_PATH)
    v.set_defaults(func=cmd_verify)
    i = csub.add_parser("inspect", help="step, layout, files and tensors (shapes, dtypes) of a checkpoint")
    i.add_argument("path", help=CHECKPOINT_PATH)
    i.set_defaults(func=cmd_inspect)
    k = csub.add_parser("convert", help="consolidate a checkpoint (any layout) into one file in a new run "
                                        "directory; any layout resumes it")
    k.add_argument("src", help=CHECKPOINT_PATH)
    k.add_argument("dst", help="a new (empty) run directory")
    k.set_defaults(func=cmd_convert)
    x = csub.add_parser("export", help="write a checkpoint (any layout) as a transformers model directory: "
                                       "config.json, model.safetensors, tokenizer (needs the hf extra)")
    x.add_argument("path", help=CHECKPOINT_PATH)
    x.add_argument("--format", choices=["hf"], default="hf", help="hf: GPT2LMHeadModel or LlamaForCausalLM")
    x.add_argument("--out", required=True, help="a new (empty) directory for from_pretrained")
    x.set_defaults(func=cmd_export)
    m = csub.add_parser("import", help="a transformers model directory (on disk) as the step-0 checkpoint "
                                       "of a new run directory (needs the hf extra)")
    m.add_argument("dir", help="a directory written by save_pretrained (config.json, safetensors, tokenizer)")
    m.add_argument("--format", choices=["hf"], default="hf", help="hf: GPT-2 or Llama models")
    m.add_argument("--out", required=True, help="a new run directory (train.out_dir)")
    m.add_argument("--separator", help=SEPARATOR_HELP)
    m.set_defaults(func=cmd_import)


def cmd_verify(args) -> None:
    from .integrity import verify
    from .manager import resolve
    path = resolve(args.path)
    manifest = verify(path)
    total = sum(e if isinstance(e, int) else e["size"] for e in manifest["files"].values())
    print(f"ok: {path}: {len(manifest['files'])} files, {total:,} bytes, every size and checksum matches "
          f"the manifest")


def cmd_inspect(args) -> None:
    from .manager import inspect, resolve
    info = inspect(resolve(args.path))
    layout = " ".join(f"{k}={v}" for k, v in info["layout"].items())
    print(f"checkpoint {info['path']}\nstep {info['step']} | format {info['format']} | layout {layout}")
    print(f"{len(info['files'])} files, {sum(info['files'].values()):,} bytes (checksums verified)")
    for shard, tensors in info["tensors"].items():
        print(f"-- {shard or '.'}: {len(tensors)} tensors")
        for name, (shape, dtype) in tensors.items():
            print(f"   {name:<48} {str(tuple(shape)):<20} {dtype}")


def cmd_convert(args) -> None:
    from .manager import convert, resolve
    out = convert(resolve(args.src), args.dst)
    print(f"wrote {out}: one file, every tensor whole; train with train.out_dir={args.dst} at any layout")


def cmd_export(args) -> None:
    from .hf import export_hf
    from .manager import resolve
    info = export_hf(resolve(args.path), args.out)
    tok = "with its tokenizer" if info["tokenizer"] else "without a tokenizer (the checkpoint carries none)"
    print(f"wrote {info['path']}: {info['class']} (config.json, model.safetensors) {tok}; load it with "
          f"transformers' from_pretrained")


def cmd_import(args) -> None:
    from ..logs import setup_logging
    from .hf import import_hf
    setup_logging()  # says which document separator it chose
    path = import_hf(args.dir, args.out, separator=args.separator)
    print(f"wrote {path} (step 0) and {os.path.join(args.out, 'config.yaml')}; train on with `megatron-lite "
          f"train --config {os.path.join(args.out, 'config.yaml')} data.dir=DIR` at any layout (prepare DIR "
          f"with --tokenizer {path / 'tokenizer.json'})")
