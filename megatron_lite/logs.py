"""Logging for runs: the standard `logging` module, one handler, rank 0 speaks.

    setup_logging(rank)                       # once per process, by the CLI
    log.info("...")                           # shown on rank 0 only
    log.warning("...", extra={"all_ranks": True})   # shown by every rank (prefixed with it)

Information goes to stdout; warnings and errors (a damaged checkpoint named, a fallback) to
stderr, where the CLI's `error:` lines go too. Lines go through tqdm.write, so a progress bar on the
same terminal is redrawn below them instead of being torn.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


class RankZeroFilter(logging.Filter):
    """Pass rank 0's records, and other ranks' records marked all_ranks=True."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if getattr(record, "all_ranks", False):
            record.msg = f"[rank {self.rank}] {record.msg}"
            return True
        return False


class TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Route the package's log records through two rank-filtered handlers: below WARNING to
    stdout, WARNING and above to stderr."""
    logger = logging.getLogger("megatron_lite")
    for h in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
        logger.removeHandler(h)
    for stream, low, high in ((sys.stdout, logging.NOTSET, logging.WARNING),
                              (sys.stderr, logging.WARNING, None)):
        handler = TqdmHandler(stream)
        handler.setLevel(low)
        handler.setFormatter(logging.Formatter("%(message)s"))
        if high is not None:
            handler.addFilter(lambda record, high=high: record.levelno < high)
        handler.addFilter(RankZeroFilter(rank))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
