"""`megatron-lite` command line: train, prepare-data, generate, plan (layout planner), checkpoint
verify|inspect|convert|export|import, launch torchrun|slurm, verify (parallel layouts vs serial).

User-caused errors (config, data, checkpoint paths) print one sentence and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from .errors import PeerFailure, UsageError, UserError

log = logging.getLogger("megatron_lite.cli")
SEPARATOR_HELP = ("the token that ends every document with a loaded tokenizer: eos, bos or a token, e.g. "
                  "'<|end_of_text|>' (default: the one recorded with it, else its eos, else its bos, else "
                  "<|endoftext|>)")


def cmd_train(args) -> int:
    from .config import Config
    from .distributed.env import RunEnv
    from .distributed.stop import StopRequests, requeue_marker
    # The signal handlers go in before torch loads (seconds): a signal during startup is a request.
    cfg = Config.from_yaml(args.config, args.overrides)
    env = RunEnv.from_environ()
    # Only a launcher's worker watches its parent: a shell that exits must not stop a nohup'ed run.
    stops = StopRequests(cfg.launch.stop_signals, watch_parent=env.source in ("torchrun", "slurm")).install()
    from .logs import setup_logging
    setup_logging(env.rank)
    os.makedirs(cfg.train.out_dir, exist_ok=True)
    marker = requeue_marker(cfg.train.out_dir)
    if env.rank == 0:
        marker.unlink(missing_ok=True)  # a marker from an earlier stop is answered by this run
    hint = (f"another rank died, stalled, or was slower than launch.collective_timeout_s="
            f"{cfg.launch.collective_timeout_s:g}; a rerun resumes from the newest checkpoint in "
            f"{cfg.train.out_dir}/checkpoints.")
    from .distributed import comm
    with comm.session(env, hint):
        try:
            return _train(cfg, env, stops, marker)
        finally:
            stops.uninstall()


def _train(cfg, env, stops, marker) -> int:
    from .model.counts import param_count
    from .train import Trainer
    trainer = Trainer(cfg, env, stop_hooks=(stops.hook,))
    layout = trainer.layout
    log.info(f"model: {param_count(cfg.model) / 1e6:.2f}M parameters | device {trainer.device} | "
             f"{cfg.train.precision} | {layout.describe()} | batch {cfg.data.micro_batch_size}x"
             f"{layout.micro_batches}x{layout.dp} of {trainer.seq_len} tokens")
    history = trainer.fit()
    vals = history["val_loss"]
    if vals:
        log.info(f"validation loss: first {vals[0][1]:.4f} (step {vals[0][0]}) -> last {vals[-1][1]:.4f} "
                 f"(step {vals[-1][0]})")
    if stops.stopped_by:
        return _stopped_early(cfg, env, trainer, stops.stopped_by, marker)
    if cfg.train.sample_tokens > 0:
        text = trainer.sample()  # every rank takes part: the model is split across them
        if text is None:
            log.info(f"(no sample under pipeline parallelism: run `megatron-lite generate --checkpoint "
                     f"{cfg.train.out_dir}`)")
        else:
            log.info(f"---- sample ----\n{text}\n----------------")
    return 0


def _stopped_early(cfg, env, trainer, reason: str, marker) -> int:
    from .distributed.stop import write_requeue_marker
    if env.rank == 0:
        write_requeue_marker(marker, trainer.state.step, reason, trainer.checkpoints.latest())
    # torchrun counts any non-zero worker status as a failure and would restart the workers.
    code = 0 if env.source == "torchrun" else cfg.launch.requeue_exit_code
    log.info(f"stopped at step {trainer.state.step} ({reason}) with a checkpoint; rerun (or requeue) "
             f"to resume; exit status {code}")
    return code


def cmd_prepare(args) -> None:
    from .data import prepare
    from .logs import setup_logging
    if args.seed < 0:  # numpy's generators take non-negative seeds only
        raise UsageError(f"--seed={args.seed} must be >= 0.")
    if args.max_bytes < 0:
        raise UsageError(f"--max-bytes={args.max_bytes} must be >= 0 (0 = the whole corpus).")
    setup_logging()
    prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
            max_bytes=args.max_bytes or None, force=args.force, separator=args.separator)


def cmd_generate(args) -> None:
    import torch

    from .checkpoint import load_model_weights, resolve, verify
    from .config import Config
    from .data import load_tokenizer
    from .model import GPT, generate
    from .train.trainer import resolve_device
    _check_sampling(args)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
        bad = args.prompt[e.start].encode("utf-8", "surrogateescape")
        raise UsageError(f"--prompt is not valid UTF-8 (byte 0x{bad.hex()} at character {e.start}); pass "
                         f"UTF-8 text.") from None
    path = resolve(args.checkpoint)
    verify(path)  # every file against its checksum before any of it is read
    cfg = Config.from_yaml(path / "config.yaml")
    device = resolve_device(args.device)
    model = GPT(cfg.model, seed=None).to(device)
    load_model_weights(path, model)
    tok = load_tokenizer(path)
    ids = tok.encode(args.prompt)
    if not ids:
        ids = [tok.eot_id]  # an empty prompt starts a fresh document
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.tensor([ids], device=device)
    out = generate(model, x, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, generator=g)
    print(tok.decode(out[0].tolist()))


SEED_MAX = 2**63 - 1  # torch's generators take a signed 64-bit seed
MAX_NEW_TOKENS = 1_000_000  # the sampled ids stay in memory; more would run for days, not fail


def _check_sampling(args) -> None:
    """Sampling arguments in the ranges torch accepts, each refused in one sentence (nan and inf
    compare false with every bound, so they are named before the range checks)."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature={args.temperature} must be a finite number >= 0 (0 = greedy "
                         f"decoding).")
    if args.top_k < 0:  # any larger value keeps the whole vocabulary
        raise UsageError(f"--top-k={args.top_k} must be >= 0 (0 = no top-k filtering).")
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} must be between 0 and {MAX_NEW_TOKENS:,}.")
    if not 0 <= args.seed <= SEED_MAX:
        raise UsageError(f"--seed={args.seed} must be between 0 and 2**63-1 = {SEED_MAX}.")


def cmd_checkpoint_verify(args) -> None:
    from .checkpoint import resolve, verify
    path = resolve(args.path)
    manifest = verify(path)
    total = sum(e if isinstance(e, int) else e["size"] for e in manifest["files"].values())
    print(f"ok: {path}: {len(manifest['files'])} files, {total:,} bytes, every size and checksum matches "
          f"the manifest")


def cmd_checkpoint_inspect(args) -> None:
    from .checkpoint import inspect, resolve
    info = inspect(resolve(args.path))
    layout = " ".join(f"{k}={v}" for k, v in info["layout"].items())
    print(f"checkpoint {info['path']}\nstep {info['step']} | format {info['format']} | layout {layout}")
    print(f"{len(info['files'])} files, {sum(info['files'].values()):,} bytes (checksums verified)")
    for shard, tensors in info["tensors"].items():
        print(f"-- {shard or '.'}: {len(tensors)} tensors")
        for name, (shape, dtype) in tensors.items():
            print(f"   {name:<48} {str(tuple(shape)):<20} {dtype}")


def cmd_checkpoint_convert(args) -> None:
    from .checkpoint import convert, resolve
    out = convert(resolve(args.src), args.dst)
    print(f"wrote {out}: one file, every tensor whole; train with train.out_dir={args.dst} at any layout")


def cmd_checkpoint_export(args) -> None:
    from .checkpoint import resolve
    from .checkpoint.hf import export_hf
    info = export_hf(resolve(args.path), args.out)
    tok = "with its tokenizer" if info["tokenizer"] else "without a tokenizer (the checkpoint carries none)"
    print(f"wrote {info['path']}: {info['class']} (config.json, model.safetensors) {tok}; load it with "
          f"transformers' from_pretrained")


def cmd_checkpoint_import(args) -> None:
    from .checkpoint.hf import import_hf
    from .logs import setup_logging
    setup_logging()  # says which document separator it chose
    path = import_hf(args.dir, args.out, separator=args.separator)
    print(f"wrote {path} (step 0) and {os.path.join(args.out, 'config.yaml')}; train on with `megatron-lite "
          f"train --config {os.path.join(args.out, 'config.yaml')} data.dir=DIR` at any layout (prepare DIR "
          f"with --tokenizer {path / 'tokenizer.json'})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-lite", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GPT from a YAML config (resumes from train.out_dir)")
    t.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 model.dropout=0.1")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("prepare-data", help="tokenize local sources into a memory-mapped token store")
    d.add_argument("--source", nargs="+", default=["stdlib"],
                   help="'stdlib' (the embedded corpus: this Python's standard library), text/.py/.md "
                        "files, .jsonl, .parquet, a directory of them, or a save_to_disk directory")
    d.add_argument("--out", required=True, help="output directory (e.g. data/stdlib)")
    d.add_argument("--tokenizer", default="bpe",
                   help="'bpe' (train byte-level BPE), 'bytes', or a tokenizer.json")
    d.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (with --tokenizer bpe)")
    d.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out")
    d.add_argument("--text-field", default="text", help="text column of JSON/parquet/saved datasets")
    d.add_argument("--max-bytes", type=int, default=8_000_000,
                   help="cap on the stdlib corpus size in bytes (0 = all of it)")
    d.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    d.add_argument("--force", action="store_true", help="rebuild even if --out is already prepared")
    d.add_argument("--separator", help=SEPARATOR_HELP)
    d.set_defaults(func=cmd_prepare)

    g = sub.add_parser("generate", help="sample text from a checkpoint (KV-cached decoding)")
    g.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ or a step_* directory")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.set_defaults(func=cmd_generate)

    from .plan.cli import add_parser as add_plan_parser
    add_plan_parser(sub)

    c = sub.add_parser("checkpoint", help="verify, inspect, convert, export or import a checkpoint")
    csub = c.add_subparsers(dest="checkpoint_command", required=True)
    v = csub.add_parser("verify", help="check every file against the manifest's sizes and checksums "
                                       "(exit 2 naming the first damaged file)")
    v.add_argument("path", help="run directory, its checkpoints/ or a step_* directory")
    v.set_defaults(func=cmd_checkpoint_verify)
    i = csub.add_parser("inspect", help="step, layout, files and tensors (shapes, dtypes) of a checkpoint")
    i.add_argument("path", help="run directory, its checkpoints/ or a step_* directory")
    i.set_defaults(func=cmd_checkpoint_inspect)
    k = csub.add_parser("convert", help="consolidate a checkpoint (any layout) into one file in a new run "
                                        "directory; any layout resumes it")
    k.add_argument("src", help="run directory, its checkpoints/ or a step_* directory")
    k.add_argument("dst", help="a new (empty) run directory")
    k.set_defaults(func=cmd_checkpoint_convert)
    x = csub.add_parser("export", help="write a checkpoint (any layout) as a transformers model directory: "
                                       "config.json, model.safetensors, tokenizer (needs the hf extra)")
    x.add_argument("path", help="run directory, its checkpoints/ or a step_* directory")
    x.add_argument("--format", choices=["hf"], default="hf", help="hf: GPT2LMHeadModel or LlamaForCausalLM")
    x.add_argument("--out", required=True, help="a new (empty) directory for from_pretrained")
    x.set_defaults(func=cmd_checkpoint_export)
    m = csub.add_parser("import", help="a transformers model directory (on disk) as the step-0 checkpoint "
                                       "of a new run directory (needs the hf extra)")
    m.add_argument("dir", help="a directory written by save_pretrained (config.json, safetensors, tokenizer)")
    m.add_argument("--format", choices=["hf"], default="hf", help="hf: GPT-2 or Llama models")
    m.add_argument("--out", required=True, help="a new run directory (train.out_dir)")
    m.add_argument("--separator", help=SEPARATOR_HELP)
    m.set_defaults(func=cmd_checkpoint_import)

    from .verify.cli import add_parser as add_verify_parser
    add_verify_parser(sub)

    from .launcher import add_parsers as add_launch_parsers
    add_launch_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        if _speaks():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except PeerFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _speaks() -> bool:
    """Whether this process prints a user error. Under a launcher every rank runs the same checks
    and fails with the same sentence: the first process of each node says it, so a plain torchrun
    job prints it once, not once per rank."""
    from .distributed.env import RunEnv
    try:
        return RunEnv.from_environ().local_rank == 0
    except UserError:
        return True  # the launcher's environment is itself broken: every process says so


def entry() -> None:
    """The `megatron-lite` console script: a distributed run ends without native teardown
    (comm.exit_process), which can abort a process that has finished its work."""
    code = main()
    from .distributed.env import launched_world_size
    if launched_world_size() > 1:
        from .distributed import comm
        comm.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
