"""`megatron-lite` command line: train, prepare-data, generate, plan (layout planner), checkpoint
verify|inspect|convert|export|import, launch torchrun|slurm, verify (parallel layouts vs serial).

Each command module adds its own sub-parser (building it imports nothing heavy: `--help` stays
fast); this module registers them and runs the chosen command. User-caused errors (config, data,
checkpoint paths) print one sentence and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import generate, launcher
from .checkpoint import cli as checkpoint_cli
from .data import cli as data_cli
from .errors import PeerFailure, UserError
from .plan import cli as plan_cli
from .train import cli as train_cli
from .verify import cli as verify_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-lite", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add in (train_cli.add_parser, data_cli.add_parser, generate.add_parser, plan_cli.add_parser,
                checkpoint_cli.add_parser, verify_cli.add_parser, launcher.add_parsers):
        add(sub)
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
