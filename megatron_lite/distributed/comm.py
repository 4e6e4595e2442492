"""The only module that calls torch.distributed collectives.

Device-agnostic (gloo on CPU, NCCL on GPU), absorbs torch API differences (gloo's reduce-scatter is
an all-reduce, so here it is built from point-to-point transfers; older torch spells the tensor
collectives differently), and counts the bytes each
logical operation moves, per kind, into a CommStats the caller holds:

    stats = CommStats()
    with stats.recording():
        ...train step...
    stats.bytes["all_reduce"]
    stats.exposed_seconds()        # how long this thread sat waiting for communication

Collectives come in two forms: the plain one returns when done; the `*_async` one returns a Pending
at once (the collective runs in the backend's own thread or stream), whose wait() blocks until
it is done and returns the result — what overlapping communication with computation is built on.

Every function takes its process group explicitly. A collective or transfer that was started and
then failed (a peer died, closed the connection or stalled past the timeout) raises
CollectiveFailure, so a caller tells a peer's failure from a bug by the exception's type
(is_peer_failure); `session` turns one into a PeerFailure line.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import PeerFailure


class CollectiveFailure(RuntimeError):
    """A collective or point-to-point transfer this process had started did not complete: a peer
    died, closed the connection or stalled past the group's timeout (its arguments were checked
    when it was issued, so its failure is not this process's doing)."""


@contextmanager
def _started():
    """Around the wait of a started collective: gloo raises a plain RuntimeError there."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, (CollectiveFailure, dist.DistError)):
            raise
        raise CollectiveFailure(str(e)) from e


@dataclass(frozen=True)
class Transfer:
    """A started point-to-point transfer (isend / irecv); wait() raises CollectiveFailure when its
    peer fails."""
    work: object

    def wait(self) -> None:
        _wait(self.work, "p2p")


class Pending:
    """A started collective. wait() blocks until it is done (the first call; later ones return at
    once) and returns its result; raises CollectiveFailure when a peer fails."""

    def __init__(self, kind: str, work, result: torch.Tensor, then: Callable[[], torch.Tensor] | None = None,
                 operand: torch.Tensor | None = None):
        self.kind = kind
        self.work = work  # None: nothing to wait for (a group of one)
        self.result = result
        self.then = then  # runs once the collective is done; returns the result
        # The input, alive until the wait even if the caller drops it (a CUDA buffer freed while
        # the collective's stream still reads it could be handed out again)
        self.operand = operand
        self.launched = time.perf_counter()

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            work, self.work = self.work, None
            _wait(work, self.kind, self.launched)
            if self.then is not None:
                self.result = self.then()
            self.operand = self.then = None  # (then's closure may hold receive buffers)
        return self.result


def _wait(work, kind: str, launched: float | None = None) -> None:
    t0 = time.perf_counter()
    with _started():
        work.wait()
    stats = _recorder.get()
    if stats is not None:
        t1 = time.perf_counter()
        stats.wait_seconds[kind] += t1 - t0
        stats.events.append((kind, t0 if launched is None else launched, t0, t1))


@dataclass
class CommStats:
    """Logical payload bytes and calls per op kind: the tensor size an op is *defined* on
    (all-reduce: the input; all-gather: the gathered output; reduce-scatter: the full input), the
    Megatron accounting. Collectives issued inside `recording()` on this thread are counted; autograd
    runs CPU backward passes on the calling thread, so backward collectives count too on CPU."""
    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    # Seconds this thread spent blocked in a wait per op kind: the communication not hidden behind
    # computation (a plain collective's whole duration; an async one's remainder when waited for).
    wait_seconds: Counter = field(default_factory=Counter)
    # (kind, launched, wait began, wait ended) per waited operation, perf_counter seconds
    events: list = field(default_factory=list)

    def exposed_seconds(self) -> float:
        return sum(self.wait_seconds.values())

    @contextmanager
    def recording(self):
        token = _recorder.set(self)
        try:
            yield self
        finally:
            _recorder.reset(token)


# The CommStats collecting right now, scoped to a `with stats.recording()` block (None: not counting).
_recorder: ContextVar[CommStats | None] = ContextVar("megatron_lite_comm_stats", default=None)


def _count(kind: str, t: torch.Tensor) -> None:
    stats = _recorder.get()
    if stats is not None:
        stats.bytes[kind] += t.numel() * t.element_size()
        stats.calls[kind] += 1


def size(group) -> int:
    return dist.get_world_size(group)


def rank(group) -> int:
    return dist.get_rank(group)


def new_group(ranks: list[int], timeout_s: float | None = None):
    """A subgroup. Its collective timeout is stated: torch gives new groups its 30-minute default,
    not the default group's."""
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    return dist.new_group(ranks, **kwargs)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device, env, timeout_s: float | None = None) -> None:
    """Join the job's default process group as `env` (a RunEnv) describes it. A collective that waits
    longer than timeout_s raises on every rank still running (a peer died or stalled) instead of
    hanging. A group that already exists (a test harness made it) is used as is, if it has the
    expected size and rank."""
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(f"a process group of {dist.get_world_size()} ranks "
                               f"(this one {dist.get_rank()}) exists, but the run environment says "
                               f"{env.world_size} (rank {env.rank})")
        return
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # lets NCCL bind eagerly (torch >= 2.3)
    if env.restart_count and env.agent_store:
        # Restarted workers meet in the agent's store, which still holds the dead attempt's keys
        # (each rank's gloo address): a rank reading them first connects to a process that is gone.
        # A prefix per attempt gives every attempt fresh keys.
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                              timeout=timedelta(seconds=timeout_s or 1800))
        kwargs["store"] = dist.PrefixStore(f"megatron_lite/attempt_{env.restart_count}", store)
    else:
        kwargs["init_method"] = env.url
    dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size, **kwargs)


def destroy(barrier: bool = True) -> None:
    """Leave the job's process groups. barrier=False after a failure: a peer that died or stalled
    would hold the barrier for the whole collective timeout."""
    if dist.is_initialized():
        # Leave together: a rank tearing down its gloo connections while a peer still uses them
        # can abort the peer.
        if barrier:
            try:
                dist.barrier()
            except RuntimeError:
                pass  # a peer is already gone (it failed): tear down anyway, keep the original error
        dist.destroy_process_group()


def is_peer_failure(e: BaseException) -> bool:
    """Did this exception (or one it was raised from) come from a collective whose peer died or
    stalled? Decided by type: CollectiveFailure (our collectives and transfers, whatever the
    backend), torch's DistError (NCCL's watchdog, the store, the network); and by the group's state
    where its backend keeps one (NCCL records a timeout or a remote error: get_error())."""
    if not is_initialized():
        return False
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (CollectiveFailure, dist.DistError)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return _group_failed()


def _group_failed() -> bool:
    """The default group's recorded error, for backends that keep one (NCCL; gloo keeps none)."""
    group = dist.group.WORLD
    for device_type in getattr(group, "_device_types", ()):
        backend = group._get_backend(torch.device(device_type))
        get_error = getattr(backend, "get_error", None)
        if get_error is not None and get_error().name != "SUCCESS":
            return True
    return False


@contextmanager
def session(env, hint: str):
    """One command's time in the job's process group: a collective that failed or timed out becomes
    one PeerFailure line (with `hint`); leaving waits for the other ranks only after success, since
    a dead or stalled peer would hold that barrier for the whole collective timeout."""
    clean = False
    try:
        yield
        clean = True
    except Exception as e:
        if env.distributed and is_peer_failure(e):
            raise PeerFailure(f"rank {env.rank}: a collective failed ({_first_line(e)}): {hint}") from None
        raise
    finally:
        destroy(barrier=clean)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def exit_process(code: int = 0) -> None:
    """End a distributed process without Python's interpreter shutdown. A gloo worker thread
    (`pt_gloo_runloop`, ProcessGroupGloo::runLoop) that frees a finished work item whose tensor still
    owns a Python object takes the GIL to decref it; if that happens while the interpreter finalizes,
    Python ends the thread with pthread_exit, the forced unwind crosses the noexcept ~AsyncWork, and
    libstdc++ aborts: `terminate called without an active exception`, SIGABRT, no Python frame (seen
    on about 1 in 20 finished gloo ranks in CI; reproduced with a core dump: torch issue 190489).
    destroy_process_group() does not stop those threads (live Python references keep the groups)
    and a barrier does not help; skipping finalization does. Python's streams and logging are
    flushed first; nothing else is left to run."""
    import logging
    import sys
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(t: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce; returns t. A group of one is free."""
    return all_reduce_async(t, group, op).wait()


def all_reduce_async(t: torch.Tensor, group, op: str = "sum") -> Pending:
    """all_reduce, started: t must not be touched until the Pending is waited for."""
    if size(group) == 1:
        return Pending("all_reduce", None, t)
    _count("all_reduce", t)
    return Pending("all_reduce", dist.all_reduce(
        t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group, async_op=True), t)


def all_gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's t along dim (in group rank order)."""
    n = size(group)
    if n == 1:
        return t
    t = t.contiguous()
    out = all_gather_into(torch.empty((n * t.shape[0],) + t.shape[1:], dtype=t.dtype, device=t.device),
                          t, group)
    out = out.view((n,) + t.shape)  # (n, *t.shape): rank-major
    return torch.cat(out.unbind(0), dim=dim) if dim != 0 else out.flatten(0, 1)


def all_gather_into(out: torch.Tensor, t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's t, in group rank order, written straight into out (n * t.numel() elements,
    rank-major): no staging copy, for buffers that must keep their storage (ZeRO-3's weights)."""
    return all_gather_into_async(out, t, group).wait()


def all_gather_into_async(out: torch.Tensor, t: torch.Tensor, group) -> Pending:
    """all_gather_into, started: neither out nor t may be touched until the Pending is waited for."""
    n = size(group)
    if n == 1:
        return Pending("all_gather", None, out.copy_(t.reshape(out.shape)))
    _count("all_gather", out)
    t = t.contiguous()
    if hasattr(dist, "all_gather_into_tensor") and dist.get_backend(group) != "gloo":
        work = dist.all_gather_into_tensor(out, t, group=group, async_op=True)
    else:
        work = dist.all_gather([c.view_as(t) for c in out.chunk(n)], t, group=group, async_op=True)
    return Pending("all_gather", work, out, operand=t)


def reduce_scatter(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum t over ranks and keep this rank's chunk along dim."""
    n = size(group)
    if n == 1:
        return t
    src = t.movedim(dim, 0).contiguous()
    if dist.get_backend(group) == "gloo":  # into a new chunk: t is left as it was
        _count("reduce_scatter", src)
        out = _exchange_chunks(src, group, src.chunk(n)[rank(group)].clone()).wait()
    else:
        out = reduce_scatter_async(src, group).wait()
    return out.movedim(0, dim).contiguous() if dim != 0 else out


def reduce_scatter_async(t: torch.Tensor, group) -> Pending:
    """Sum t (contiguous, first dim divisible by the group size) over ranks and keep this rank's
    chunk of the first dim, started: t must not be touched until the Pending is waited for (on
    gloo the sum lands in t's own chunk, which is then the result: _exchange_chunks)."""
    n = size(group)
    if n == 1:
        return Pending("reduce_scatter", None, t)
    _count("reduce_scatter", t)
    if dist.get_backend(group) == "gloo":
        return _exchange_chunks(t, group, t.chunk(n)[rank(group)])
    out = torch.empty((t.shape[0] // n,) + t.shape[1:], dtype=t.dtype, device=t.device)
    if hasattr(dist, "reduce_scatter_tensor"):
        work = dist.reduce_scatter_tensor(out, t, group=group, async_op=True)
    else:
        work = dist.reduce_scatter(out, list(t.chunk(n)), group=group, async_op=True)
    return Pending("reduce_scatter", work, out, operand=t)


# The tag of _exchange_chunks's transfers: the group's pipeline and ring-attention transfers use
# others (pipeline/engine.py, parallel/context_parallel.py), and its own exchanges follow one another
# in the same order on every rank, as transfers of one tag between two ranks are matched
_EXCHANGE_TAG = 0x5C


class _Transfers:
    """Several started transfers waited for as one work."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        return True


def _exchange_chunks(t: torch.Tensor, group, out: torch.Tensor) -> Pending:
    """Reduce-scatter on gloo, started: gloo's own reduce_scatter_tensor all-reduces (torch PRs
    118911, 149869), twice a reduce-scatter's bytes on the wire. Instead every rank sends chunk j of
    t (contiguous, first dim divisible by the group size) to rank j and receives every other rank's
    chunk of its own: (n-1)/n of t each way, a ring's volume, into n-1 chunk-sized buffers. `out`
    (this rank's chunk of t, or a copy of it) adds them in rank order and is the result."""
    n, r = size(group), rank(group)
    chunks = t.chunk(n)
    received = {j: torch.empty_like(chunks[r]) for j in range(n) if j != r}
    works = []
    for k in range(1, n):  # rank r + k gets its chunk while rank r - k's comes in: no pair waits
        dst, src = (r + k) % n, (r - k) % n
        to, of = dist.get_global_rank(group, dst), dist.get_global_rank(group, src)
        works.append(dist.isend(chunks[dst], to, group=group, tag=_EXCHANGE_TAG))
        works.append(dist.irecv(received[src], of, group=group, tag=_EXCHANGE_TAG))

    def total() -> torch.Tensor:
        for j in sorted(received):
            out.add_(received[j])
        return out

    return Pending("reduce_scatter", _Transfers(works), out, total, operand=t)


def all_to_all(t: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows of t sent to every rank of the group (the first in_splits[0] to group rank 0, the next
    in_splits[1] to rank 1, ...); returns the rows received, out_splits[j] from rank j, in rank order.
    Counted on the input (every row sent, the rank's own included)."""
    if size(group) == 1:
        return t
    _count("all_to_all", t)
    out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
    t = t.contiguous()
    work = dist.all_to_all_single(out, t, out_splits, in_splits, group=group, async_op=True)
    return Pending("all_to_all", work, out, operand=t).wait()


def all_gather_object(obj, group) -> list:
    """Every rank's (small, picklable) object, in group rank order; in-memory only."""
    if size(group) == 1:
        return [obj]
    out = [None] * size(group)
    with _started():  # no async form; its own RuntimeErrors come from its collectives
        dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(t: torch.Tensor, src_global_rank: int, group) -> torch.Tensor:
    if size(group) > 1:
        _count("broadcast", t)
        _wait(dist.broadcast(t, src_global_rank, group=group, async_op=True), "broadcast")
    return t


def isend(t: torch.Tensor, dst: int, group, tag: int) -> Transfer:
    """Non-blocking send to global rank dst; wait() on the returned Transfer (keep t alive until done)."""
    _count("p2p", t)
    return Transfer(dist.isend(t.contiguous(), dst, group=group, tag=tag))


def irecv(t: torch.Tensor, src: int, group, tag: int) -> Transfer:
    """Non-blocking receive from global rank src into t; wait() on the returned Transfer."""
    return Transfer(dist.irecv(t, src, group=group, tag=tag))


def world():
    """The group of every process (for job-wide barriers and checkpoint commits)."""
    return dist.group.WORLD


def barrier(group) -> None:
    if is_initialized() and size(group) > 1:
        _wait(dist.barrier(group=group, async_op=True), "barrier")
