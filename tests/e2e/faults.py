"""What only the tests add to megatron_lite.testing.faults (starting, waiting for and hurting runs):
a run to its end, and the logged losses."""

from __future__ import annotations

from pathlib import Path

from megatron_lite.testing.faults import finish, start
from megatron_lite.train.metrics import read_metrics


def run(argv: list[str], log_path: Path, timeout: float = 300, **extra_env: str) -> tuple[int, str]:
    """Start argv (as megatron_lite.testing.faults.start does) and wait for its end: status and log."""
    return finish(start(argv, log_path, **extra_env), log_path, timeout)


def losses(out_dir: Path) -> list[float]:
    """Every step's loss in step order (a step logged again after a restart: the later line)."""
    got = read_metrics(out_dir, "train/loss")
    assert sorted(got) == list(range(1, len(got) + 1)), f"steps logged: {sorted(got)}"
    return [got[s] for s in sorted(got)]
