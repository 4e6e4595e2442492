"""`megatron-lite generate`: its sub-parser and command, sampling text from a checkpoint. A command
module beside plan and verify (it reads a checkpoint, the tokenizer and the model); building the
parser imports nothing heavy (torch loads when the command runs)."""

from __future__ import annotations

import math

from .errors import UsageError

SEED_MAX = 2**63 - 1  # torch's generators take a signed 64-bit seed
MAX_NEW_TOKENS = 1_000_000  # the sampled ids stay in memory; more would run for days, not fail


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="sample text from a checkpoint (KV-cached decoding)")
    g.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ or a step_* directory")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    import torch

    from .checkpoint import load_model_weights, resolve, verify
    from .config import Config
    from .data import load_tokenizer
    from .model import GPT, generate
    from .train.trainer import resolve_device
    check_sampling(args)
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


def check_sampling(args) -> None:
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
