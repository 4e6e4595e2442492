"""The only module that calls torch.distributed collectives.

Device-agnostic (gloo on CPU, NCCL on GPU), absorbs torch API differences (gloo has no
reduce-scatter; older torch spells the tensor collectives differently), and counts the bytes each
logical operation moves, per kind, into a CommStats the caller holds:

    stats = CommStats()
    with stats.recording():
        ...train step...
    stats.bytes["all_reduce"]

Every function takes its process group explicitly.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Logical payload bytes and calls per op kind: the tensor size an op is *defined* on
    (all-reduce: the input; all-gather: the gathered output; reduce-scatter: the full input), the
    Megatron accounting. Collectives issued inside `recording()` on this thread are counted; autograd
    runs CPU backward passes on the calling thread, so backward collectives count too on CPU."""
    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

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


# What gloo and NCCL say when a peer is gone or a collective timed out (their exception types vary
# across torch versions: RuntimeError, DistBackendError, DistNetworkError).
_PEER_FAILURE = ("connection closed by peer", "connection reset by peer", "timed out", "timeout",
                 "broken pipe", "socket closed", "nccl", "watchdog", "connection refused")


def is_peer_failure(e: BaseException) -> bool:
    """Did this exception come from a collective whose peer died or stalled?"""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(p in str(e).lower() for p in _PEER_FAILURE)


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
    if size(group) == 1:
        return t
    _count("all_reduce", t)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return t


def all_gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's t along dim (in group rank order)."""
    n = size(group)
    if n == 1:
        return t
    t = t.contiguous()
    out = torch.empty((n * t.shape[0],) + t.shape[1:], dtype=t.dtype, device=t.device)
    _count("all_gather", out)
    if hasattr(dist, "all_gather_into_tensor") and dist.get_backend(group) != "gloo":
        dist.all_gather_into_tensor(out, t, group=group)
    else:
        dist.all_gather(list(out.chunk(n)), t, group=group)
    out = out.view((n,) + t.shape)  # (n, *t.shape): rank-major
    return torch.cat(out.unbind(0), dim=dim) if dim != 0 else out.flatten(0, 1)


def reduce_scatter(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum t over ranks and keep this rank's chunk along dim."""
    n = size(group)
    if n == 1:
        return t
    _count("reduce_scatter", t)
    chunks = [c.contiguous() for c in t.chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: reduce, then keep ours
        full = torch.stack(chunks)
        dist.all_reduce(full, group=group)
        out.copy_(full[rank(group)])
    else:
        dist.reduce_scatter(out, chunks, group=group)
    return out


def all_gather_object(obj, group) -> list:
    """Every rank's (small, picklable) object, in group rank order; in-memory only."""
    if size(group) == 1:
        return [obj]
    out = [None] * size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(t: torch.Tensor, src_global_rank: int, group) -> torch.Tensor:
    if size(group) > 1:
        _count("broadcast", t)
        dist.broadcast(t, src_global_rank, group=group)
    return t


def isend(t: torch.Tensor, dst: int, group, tag: int):
    """Non-blocking send to global rank dst; returns the work handle (keep t alive until done)."""
    _count("p2p", t)
    return dist.isend(t.contiguous(), dst, group=group, tag=tag)


def irecv(t: torch.Tensor, src: int, group, tag: int):
    """Non-blocking receive from global rank src into t; wait() on the returned work."""
    return dist.irecv(t, src, group=group, tag=tag)


def world():
    """The group of every process (for job-wide barriers and checkpoint commits)."""
    return dist.group.WORLD


def barrier(group) -> None:
    if is_initialized() and size(group) > 1:
        dist.barrier(group=group)
