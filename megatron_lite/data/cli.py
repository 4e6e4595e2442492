"""`megatron-lite prepare-data`: its sub-parser and command. Building the parser imports nothing
heavy (the sources, tokenizers and numpy load when the command runs)."""

from __future__ import annotations

from ..errors import UsageError

SEPARATOR_HELP = ("the token that ends every document with a loaded tokenizer: eos, bos or a token, e.g. "
                  "'<|end_of_text|>' (default: the one recorded with it, else its eos, else its bos, else "
                  "<|endoftext|>)")  # also `checkpoint import --separator`


def add_parser(subparsers) -> None:
    d = subparsers.add_parser("prepare-data", help="tokenize local sources into a memory-mapped token store")
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
    d.add_argument("--workers", type=int,
                   help="tokenizing processes, one core each (default: one per core this process may use); "
                        "the output is the same for any number")
    d.add_argument("--bpe-sample-bytes", type=int, default=256_000_000,
                   help="with --tokenizer bpe: train it on a seeded random sample of about this many bytes "
                        "of the training documents (default 256 MB; 0 = all of them)")
    d.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> None:
    from ..logs import setup_logging
    from .prepare import prepare
    if args.seed < 0:  # numpy's generators take non-negative seeds only
        raise UsageError(f"--seed={args.seed} must be >= 0.")
    if args.max_bytes < 0:
        raise UsageError(f"--max-bytes={args.max_bytes} must be >= 0 (0 = the whole corpus).")
    if args.bpe_sample_bytes < 0:
        raise UsageError(f"--bpe-sample-bytes={args.bpe_sample_bytes} must be >= 0 (0 = every training "
                         f"document).")
    if args.workers is not None and args.workers < 1:
        from .prepare import default_workers
        raise UsageError(f"--workers={args.workers} must be >= 1 (default: one per core, here "
                         f"{default_workers()}).")
    setup_logging()
    prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
            max_bytes=args.max_bytes or None, force=args.force, separator=args.separator,
            workers=args.workers, bpe_sample_bytes=args.bpe_sample_bytes or None)
