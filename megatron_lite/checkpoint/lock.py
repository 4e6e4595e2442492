"""One writer per run directory: an exclusive flock on RUN/run.lock.

Two trainings on one train.out_dir would remove each other's temporary checkpoint directories and
interleave their committed steps, so the process that commits checkpoints (rank 0; `checkpoint
convert` and `import` while they write) holds the lock, and a second one is refused in one
sentence naming the holder's pid and host, which the holder writes into the file.

A crash needs no clean-up: the kernel drops a flock with the last descriptor of the process that
held it, so the lock of a killed run is free at once. The file itself stays (never deleted: a
second process could then lock a new file while the first still holds the old one), and what it
says about a dead holder is only a record. On a filesystem shared by several nodes, flock must
reach every node (NFSv4 does; Lustre needs `-o flock`).

Ranks other than 0 never hold it: check_free() probes with a shared lock for an instant and
accepts a holder of their own job (`job`: a string every rank of one job shares, e.g. the address
its processes meet at), so every rank refuses a busy directory before any process group exists.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import CheckpointError

LOCK_FILE = "run.lock"
ACQUIRE_S = 2.0  # rank 0 retries this long: another rank's probe holds a shared lock for an instant
PROBE_S = 3.0  # other ranks wait this long for their rank 0 to write its job into the file


class RunLock:
    def __init__(self, run_dir: str | Path, job: str = ""):
        self.path = Path(run_dir) / LOCK_FILE
        self.job = job
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> "RunLock":
        """Take the lock (until release() or this process ends) or raise CheckpointError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        deadline = time.monotonic() + ACQUIRE_S
        while not _try(f, fcntl.LOCK_EX):
            if time.monotonic() >= deadline:
                holder = _holder(f)
                f.close()
                raise self._in_use(holder)
            time.sleep(0.02)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": self.job,
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def check_free(self) -> None:
        """Raise CheckpointError if a process of another job (any process, without a job) holds
        the lock; never hold it longer than a probe."""
        try:
            f = open(self.path)
        except FileNotFoundError:
            return
        with f:
            deadline = time.monotonic() + PROBE_S
            while not _try(f, fcntl.LOCK_SH):
                holder = _holder(f)
                if self.job and holder.get("job") == self.job:
                    return  # our own rank 0
                if not self.job or time.monotonic() >= deadline:
                    raise self._in_use(holder)
                time.sleep(0.05)
            fcntl.flock(f, fcntl.LOCK_UN)

    def _in_use(self, holder: dict) -> CheckpointError:
        pid, host = holder.get("pid"), holder.get("host")
        about = [f"pid {pid} on {host}" if pid and host else "another process"]
        if pid == os.getpid() and host == socket.gethostname():
            about.append("this very process")
        if holder.get("since"):
            about.append(f"since {holder['since']}")
        about.append(f"holding {str(self.path)!r}")
        return CheckpointError(f"run directory {str(self.path.parent)!r} is in use by another training "
                               f"({', '.join(about)}); wait for it to end or choose another train.out_dir.")


def _try(f, mode: int) -> bool:
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(f) -> dict:
    """What the holder wrote into the lock file ({} while it is still writing it)."""
    f.seek(0)
    try:
        holder = json.loads(f.read())
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
