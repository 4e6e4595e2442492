"""Stop requests from outside the loop: preemption signals and a launcher that died.

    requests = StopRequests(cfg.launch.stop_signals).install()   # the CLI does this, not tests
    trainer = Trainer(cfg, env, stop_hooks=(requests.hook,))
    trainer.fit()
    if requests.stopped_by: ...                                  # checkpoint saved: requeue me

A signal handler only sets a flag: a checkpoint save cannot run inside a handler (the main thread
may be in the middle of a collective). At each step boundary `hook` combines every rank's flag with
one small all-reduce, so a signal that reached one rank (SLURM signals each task, torchrun forwards
to each worker, a user kills one pid) stops every rank at the same step; the trainer then saves.

A second SIGINT raises KeyboardInterrupt at once: Ctrl-C twice means "now, without a checkpoint".

Installed first thing in a worker (this module imports no torch), so a signal during the seconds
of startup is a request too; the loop then stops before its first step.

A worker whose parent (the torchrun agent, slurmstepd) died is an orphan that would train on
forever: a thread watches the parent pid and turns its death into the same stop request.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..train.trainer import Trainer

log = logging.getLogger(__name__)

# What each rank reports at a step boundary (0: nothing). Orphaned sorts after every signal.
ORPHANED = 100


class StopRequests:
    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT"),
                 watch_parent: bool = True, poll_s: float = 0.5):
        self.signals = [getattr(signal, name) for name in signals]
        self.watch_parent = watch_parent
        self.poll_s = poll_s
        self.local: int = 0  # this process's request: a signal number, ORPHANED, or 0
        self.stopped_by: str | None = None  # the combined reason the loop stopped on
        self._previous: dict[int, object] = {}
        self._parent = os.getppid()
        self._done = threading.Event()

    # ---- install / remove --------------------------------------------------------------------
    def install(self) -> "StopRequests":
        """Handlers on the main thread (Python delivers signals only there) and the parent watch."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        # A parent of 1 means we were started by init (or a container's): nothing to watch.
        if self.watch_parent and self._parent > 1:
            threading.Thread(target=self._watch, name="parent-watch", daemon=True).start()
        return self

    def uninstall(self) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.local == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        # Nothing else here: no logging (its locks may be held by the interrupted code).
        self.local = self.local or signum

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            if os.getppid() != self._parent:
                self.local = self.local or ORPHANED
                log.warning(f"warning: the launcher (pid {self._parent}) is gone: stopping with a checkpoint "
                            f"at the next step instead of training on as an orphan",
                            extra={"all_ranks": True})
                return

    # ---- the stop hook -------------------------------------------------------------------------
    def hook(self, trainer: "Trainer") -> str | None:
        """Every rank's request, combined: one all-reduce of one int per rank."""
        codes = [self.local]
        import torch  # here, not at import: the CLI installs the handlers before torch loads

        from . import comm
        if trainer.env.distributed:
            flags = torch.zeros(trainer.env.world_size, dtype=torch.int64, device=trainer.device)
            flags[trainer.env.rank] = self.local
            codes = comm.all_reduce(flags, comm.world()).tolist()
        hit = [(code, rank) for rank, code in enumerate(codes) if code]
        if not hit:
            return None
        code, rank = max(hit)
        what = "its launcher died" if code == ORPHANED else f"{signal.Signals(code).name} received"
        where = f" on rank {rank}" + (f" (and {len(hit) - 1} more)" if len(hit) > 1 else "") \
            if trainer.env.distributed else ""
        self.stopped_by = f"{what}{where}"
        return self.stopped_by


def requeue_marker(out_dir) -> Path:
    """Written by rank 0 when a stop signal ended the run after its checkpoint: the job script's cue
    to requeue (`megatron-lite launch` turns it into launch.requeue_exit_code)."""
    return Path(out_dir) / "requeue.json"


def write_requeue_marker(path: Path, step: int, reason: str, checkpoint) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "reason": reason, "checkpoint": str(checkpoint)}) + "\n")
    os.replace(tmp, path)  # a reader sees the whole marker or none
