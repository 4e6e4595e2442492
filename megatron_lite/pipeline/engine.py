"""The one executor that runs any schedule's action list on this pipeline stage.

Activations go forward and gradients backward between neighbouring stages with point-to-point
messages tagged by what they carry (F|B, micro-batch, virtual stage), so no two can be confused.
Sends are non-blocking; each is waited for (and its buffer let go) at the first action after
which the schedule proves its receiver has taken it (schedules.send_releases), so the messages a
stage holds are bounded by the schedule's depth, not by the number of micro-batches; the few that
nothing proves are waited for at the end of the step. A sent output whose chunk still awaits its
backward is then freed too (its data replaced by one element; the backward needs only its grad_fn,
see _free_sent_output), so a stage holds an activation-sized message per chunk only between its
forward and its send's release, not until its backward. Each receive is posted one receive ahead
(so it arrives during the compute before it) and waited for when its action comes. Only that wait
blocks, so a schedule whose simulation completes (pipeline/schedules.py) cannot deadlock here.
Every message has the shape agreed up front: (micro-batch, sequence [/ tp under sequence
parallelism], hidden).
Evaluation (forward_only) runs the forward-only lists instead, which take any number of micro-batches.

Each micro-batch's loss is scaled by 1/m before its backward, so the accumulated gradient is the
gradient of the mean loss — exactly what serial gradient accumulation over the same micro-batches
computes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..distributed import comm
from ..model.gpt import split_batch
from ..parallel.grads import nan_if_nonfinite
from .partition import Chunk
from .schedules import Action, build, build_forward_only, message, send_releases

# The C++ autograd engine, which checks a root's gradient against the shape its grad_fn recorded
# when the output was made; torch.autograd.backward checks it against the tensor's current shape,
# which a freed output (one element) no longer has. Same positional signature since torch 2.0:
# (roots, grads, keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad).
_run_backward = torch.autograd.Variable._execution_engine.run_backward


def _free_sent_output(out: torch.Tensor) -> None:
    """Let go of a chunk output's values once its send has completed; the tensor object and its
    grad_fn stay for the backward, which only feeds the received gradient into that grad_fn.

    That is safe because nothing reads the output's values again: a chunk ends with a block's
    residual add (or the embedding: a lookup, a position add, dropout, the sequence split — none
    saves its result), and the next chunk's ops work on the received copy on the other stage. If
    a model's chunk ended instead with an op that saves its own result (tanh, exp, softmax, a norm
    that saves its output), autograd would hold that result through a tensor of its own sharing
    the storage: the backward would still be exact, but nothing would be freed, and plan's
    pipeline term (schedules.held_messages) would undercount by a message per chunk in flight.
    The assert below catches that for ATen ops (a class attribute: reading the saved value itself
    would unpack it, which under activation checkpointing means recomputing). A view (_base set)
    shares its base's storage, so replacing its data would free nothing: it is left alone."""
    if out._base is not None:
        return
    assert not hasattr(type(out.grad_fn), "_saved_result"), (
        f"a pipeline chunk's last op ({out.grad_fn.name()}) saves its output for its backward; "
        f"the engine's freeing of sent outputs assumes it does not (schedules.held_messages)")
    out.data = torch.empty((1,), device=out.device, dtype=out.dtype)


@dataclass
class StepTrace:
    """What one run did: per-action (kind, start, end) times, the peak number of micro-batches
    whose activations were held at once, and the peak bytes of messages the engine held (sent and
    not yet released, received and not yet consumed) (for the bubble / memory benchmarks)."""
    events: list[tuple[str, float, float]] = field(default_factory=list)
    peak_inflight: int = 0
    peak_message_bytes: int = 0


class PipelineEngine:
    def __init__(self, model, chunks: list[Chunk], stage: int, pp_ranks: list[int], pp_group, schedule: str,
                 act_shape: tuple[int, ...], device: torch.device, autocast=contextlib.nullcontext,
                 dtype: torch.dtype = torch.float32, prefetch: bool = True, poison_nonfinite: bool = False):
        self.model = model
        self.chunks = chunks
        self.stage = stage
        self.pp = len(pp_ranks)
        self.v = len(chunks)
        self.pp_ranks = pp_ranks
        self.group = pp_group
        self.schedule = schedule
        self.act_shape = act_shape  # (micro-batch, sequence or its shard, hidden)
        self.device = device
        self.autocast = autocast
        self.dtype = dtype  # of the residual stream (fp32 also under bf16 autocast)
        self.prefetch = prefetch  # post each receive one ahead (False: only when it is needed)
        # A non-finite loss makes its whole gradient NaN (for an optimizer that skips on a
        # non-finite gradient norm, e.g. DeepSpeed's, but never sees the loss).
        self.poison_nonfinite = poison_nonfinite
        self.trace = StepTrace()

    def _message_bytes(self, *holders) -> int:
        """Bytes of the distinct message-sized buffers the holders reference (a sent output and
        the output kept for its backward are one buffer)."""
        storages = {}
        for held in holders:
            for t in held:
                if tuple(t.shape) == tuple(self.act_shape):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def _tag(self, a: Action) -> int:
        kind, mb, vs = message(a, self.stage, self.pp)
        return (mb * self.pp * self.v + vs) * 2 + (kind == "B")

    def run(self, batches: list[tuple], forward_only: bool = False,
            weights: list[float] | None = None) -> torch.Tensor:
        """Run one step over the micro-batches; returns the mean loss (on every stage), micro-batch
        j's loss weighted by weights[j] (train/backends.loss_weights; None: 1 each)."""
        m = len(batches)
        weights = weights or [1.0] * m
        actions, releases = _stage_plan(self.schedule, self.pp, m, self.v, forward_only, self.stage)
        inbox: dict[tuple, torch.Tensor] = {}
        inputs: dict[tuple, torch.Tensor] = {}
        outputs: dict[tuple, torch.Tensor] = {}
        grads: dict[tuple, torch.Tensor] = {}
        # action index -> (work, tensor, key of the chunk output it sends or None) until known done
        sends: dict[int, tuple] = {}
        # losses are summed in fp32 also under bf16 (and in fp64 for an fp64 model, as its serial run)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.promote_types(self.dtype, torch.float32))
        inflight = 0
        self.trace = StepTrace()
        grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
        # Receives are posted one ahead: while this rank computes, the next message it will need
        # is already arriving, so the transfer overlaps compute instead of adding to the bubble.
        recv_at = [i for i, a in enumerate(actions) if a.kind in ("RECV_F", "RECV_B")]
        posted: dict[int, tuple] = {}

        def post(k: int) -> None:
            if k < len(recv_at):
                a = actions[recv_at[k]]
                buf = torch.empty(self.act_shape, device=self.device, dtype=self.dtype)
                posted[recv_at[k]] = (comm.irecv(buf, self.pp_ranks[a.peer], self.group, self._tag(a)), buf)

        if self.prefetch:
            post(0)
        k = 0  # receives consumed so far
        for i, a in enumerate(actions):
            key = (a.mb, a.chunk)
            chunk = self.chunks[a.chunk]
            t0 = time.perf_counter()
            if a.kind in ("RECV_F", "RECV_B"):
                if i not in posted:
                    post(k)
                work, buf = posted.pop(i)
                k += 1
                if self.prefetch:
                    post(k)  # the following receive, before this rank goes back to computing
                work.wait()
                inbox[(a.kind, *key)] = buf
            elif a.kind == "F":
                x, y, docs = split_batch(batches[a.mb])
                inp = x if chunk.first else inbox.pop(("RECV_F", *key)).requires_grad_(not forward_only)
                with grad_ctx, self.autocast():
                    out = self.model.run(inp, chunk.layers, y if chunk.last else None, first=chunk.first,
                                         last=chunk.last, docs=docs)
                if chunk.last:
                    loss = out[1]
                    if weights[a.mb] != 1.0:
                        loss = loss * weights[a.mb]
                    loss_sum += loss.detach()
                    if self.poison_nonfinite:
                        loss = nan_if_nonfinite(loss)
                    out = loss / m  # the mean over micro-batches, as serial accumulation averages
                inputs[key], outputs[key] = inp, out
                inflight += 1
                self.trace.peak_inflight = max(self.trace.peak_inflight, inflight)
            elif a.kind == "SEND_F":
                t = outputs[key].detach()
                if forward_only:
                    del outputs[key], inputs[key]
                    inflight -= 1
                sends[i] = (comm.isend(t, self.pp_ranks[a.peer], self.group, self._tag(a)), t, key)
            elif a.kind == "B":
                inp, out = inputs.pop(key), outputs.pop(key)
                if chunk.last:
                    torch.autograd.backward(out)
                else:
                    # the engine directly: the output may be freed (_free_sent_output)
                    _run_backward((out,), (inbox.pop(("RECV_B", *key)),), False, False, (), True, True)
                if not chunk.first:
                    grads[key] = inp.grad
                inflight -= 1
            elif a.kind == "SEND_B":
                g = grads.pop(key)
                sends[i] = (comm.isend(g, self.pp_ranks[a.peer], self.group, self._tag(a)), g, None)
            self.trace.events.append((a.kind, t0, time.perf_counter()))
            held = self._message_bytes(outputs.values(), inbox.values(), grads.values(),
                                       (t for _, t, _ in sends.values()), (b for _, b in posted.values()))
            self.trace.peak_message_bytes = max(self.trace.peak_message_bytes, held)
            for j in releases.get(i, ()):  # its receiver has taken it: the wait returns at once
                work, _, sent = sends.pop(j)
                work.wait()
                if sent in outputs:  # its chunk awaits its backward (the loss is never sent)
                    _free_sent_output(outputs[sent])
        for work, _, _ in sends.values():
            work.wait()
        if forward_only:  # a forward-only run leaves the last chunk's outputs unconsumed
            inputs.clear()
            outputs.clear()
        # Only the stage with the last chunk has the loss: share it with every stage.
        mean = loss_sum / m
        comm.all_reduce(mean, self.group)
        return mean


@lru_cache(maxsize=64)
def _stage_plan(schedule: str, pp: int, m: int, v: int, forward_only: bool, stage: int):
    """This stage's action list and send releases: the same every step of a run, so built once
    (the vector-clock pass over every stage's list is not per-step work)."""
    lists = build_forward_only(pp, m, v) if forward_only else build(schedule, pp, m, v)
    return lists[stage], send_releases(lists)[stage]

