"""`megatron-lite verify`: its sub-parser and command. Building the parser imports nothing heavy (the
runs, and torch, load when the command runs)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    r = subparsers.add_parser("verify", help="train a tiny GPT at every layout that fits this job (run it "
                                             "under torchrun or srun), compare with the serial model; exit 1 "
                                             "on mismatch")
    r.add_argument("--layouts", nargs="+", metavar="PATTERN",
                   help="only the layouts whose name contains one of these globs, from every valid "
                        "combination (e.g. 'ds-zero' 'tp2+sp.pp2:*' 'ep2'); default: a set using every "
                        "variant")
    r.add_argument("--steps", type=int, default=3, help="AdamW steps per layout")
    r.add_argument("--json", metavar="OUT", help="also write the table (and tolerances) to this JSON file")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="of every run: bf16 compares bf16 layouts with the serial bf16 run (looser "
                        "tolerances, verify/compare.py)")
    r.add_argument("--document-mask", action="store_true",
                   help="every run (the serial one too) trains on packed documents with attention kept "
                        "inside each, positions restarted and separator targets ignored")
    r.add_argument("--moe", action="store_true",
                   help="a mixture-of-experts tiny model (every other block 4 experts, top 2, a shared "
                        "one, both router losses): adds the expert-parallel layouts (ep2, ep4: every ep "
                        "the layout rules accept) and leaves out what they refuse MoE (e.g. sp, DeepSpeed)")
    r.add_argument("overrides", nargs="*",
                   help="model.* overrides of the tiny model, e.g. model.activation=swiglu")
    r.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    from ..distributed import comm
    from ..distributed.env import RunEnv
    from ..logs import setup_logging
    from .run import verify
    env = RunEnv.from_environ()
    setup_logging(env.rank)
    with comm.session(env, "another rank died or stalled during verify."):
        return verify(env, steps=args.steps, patterns=args.layouts, model_overrides=args.overrides,
                      json_path=args.json, device=args.device, precision=args.precision,
                      documents=args.document_mask, moe=args.moe)
