"""Pipeline schedules as pure data: for every stage, the ordered list of actions it performs.

    Action("F", mb, chunk)        forward micro-batch mb through model chunk `chunk` of this stage
    Action("B", mb, chunk)        backward of the same
    Action("RECV_F"/"SEND_F", mb, chunk, peer)   activations in / out (peer = stage index)
    Action("RECV_B"/"SEND_B", mb, chunk, peer)   gradients in / out

A rank with v chunks (interleaving) holds virtual stages chunk * pp + stage, so the model is cut
into pp * v pieces visited round-robin. Sends never block (isend), receives do, so a list is
deadlock-free iff the simulator below can run all lists to completion — the unit tests check it
for every schedule. One executor (pipeline/engine.py) runs any list.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LayoutError


@dataclass(frozen=True)
class Action:
    kind: str  # F, B, RECV_F, SEND_F, RECV_B, SEND_B
    mb: int
    chunk: int = 0
    peer: int = -1

    def __repr__(self) -> str:
        peer = (f"->{self.peer}" if self.kind.startswith("SEND")
                else f"<-{self.peer}" if self.kind.startswith("RECV") else "")
        return f"{self.kind}{self.mb}.{self.chunk}{peer}"


def message(a: Action, stage: int, pp: int) -> tuple[str, int, int]:
    """What a send or receive carries: (F|B, micro-batch, virtual stage that produced it). A send
    and the receive that takes it have the same message; the executor tags p2p traffic by it."""
    vs = a.chunk * pp + stage
    if a.kind == "SEND_F":
        return ("F", a.mb, vs)
    if a.kind == "RECV_F":
        return ("F", a.mb, vs - 1)
    if a.kind == "SEND_B":
        return ("B", a.mb, vs)
    if a.kind == "RECV_B":
        return ("B", a.mb, vs + 1)
    raise ValueError(f"{a} is not a communication action")


def _with_comm(compute: list[tuple[str, int, int]], stage: int, pp: int, v: int) -> list[Action]:
    """Insert the receives before and the sends after every compute action."""
    last_virtual = pp * v - 1
    out: list[Action] = []
    for kind, mb, chunk in compute:
        vs = chunk * pp + stage  # virtual stage
        prev_stage, next_stage = (stage - 1) % pp, (stage + 1) % pp
        if kind == "F":
            if vs > 0:
                out.append(Action("RECV_F", mb, chunk, prev_stage))
            out.append(Action("F", mb, chunk))
            if vs < last_virtual:
                out.append(Action("SEND_F", mb, chunk, next_stage))
        else:
            if vs < last_virtual:
                out.append(Action("RECV_B", mb, chunk, next_stage))
            out.append(Action("B", mb, chunk))
            if vs > 0:
                out.append(Action("SEND_B", mb, chunk, prev_stage))
    return out


def gpipe(pp: int, m: int) -> list[list[Action]]:
    """All forwards, then all backwards (in reverse): m micro-batches in flight on every stage."""
    return [_with_comm([("F", i, 0) for i in range(m)] + [("B", i, 0) for i in reversed(range(m))], s, pp, 1)
            for s in range(pp)]


def one_f_one_b(pp: int, m: int) -> list[list[Action]]:
    """1F1B (PipeDream-flush): pp - stage - 1 warm-up forwards, then alternate one forward and
    one backward, then drain the backwards. At most pp micro-batches in flight on stage 0."""
    lists = []
    for s in range(pp):
        warm = min(pp - s - 1, m)
        compute = [("F", i, 0) for i in range(warm)]
        f, b = warm, 0
        while f < m:
            compute.append(("F", f, 0))
            f += 1
            compute.append(("B", b, 0))
            b += 1
        compute += [("B", i, 0) for i in range(b, m)]
        lists.append(_with_comm(compute, s, pp, 1))
    return lists


def interleaved(pp: int, m: int, v: int) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron): each stage holds v model chunks; micro-batches go through
    chunk 0 of every stage, then chunk 1, ..., in groups of pp. Needs m to be a multiple of pp."""
    if m % pp:
        raise LayoutError(f"the interleaved schedule needs the number of micro-batches ({m}) to be a "
                          f"multiple of parallel.pp={pp}; use {max(pp, m - m % pp)} or {m + pp - m % pp} "
                          f"micro-batches.")
    total = m * v

    def fwd_item(k: int) -> tuple[str, int, int]:
        group, within = divmod(k, pp * v)
        return ("F", group * pp + within % pp, within // pp)

    def bwd_item(k: int) -> tuple[str, int, int]:
        group, within = divmod(k, pp * v)
        return ("B", group * pp + within % pp, v - 1 - within // pp)

    lists = []
    for s in range(pp):
        warm = min((pp - s - 1) * 2 + (v - 1) * pp, total)
        compute = [fwd_item(k) for k in range(warm)]
        f, b = warm, 0
        while f < total:
            compute.append(fwd_item(f))
            f += 1
            compute.append(bwd_item(b))
            b += 1
        compute += [bwd_item(k) for k in range(b, total)]
        lists.append(_with_comm(compute, s, pp, v))
    return lists


def build_forward_only(pp: int, m: int, v: int = 1) -> list[list[Action]]:
    """Evaluation: every micro-batch through chunk 0 of each stage, then chunk 1, and so on. With no
    backward to interleave there is nothing to group by pp, so any m runs (for every schedule)."""
    return [_with_comm([("F", mb, chunk) for chunk in range(v) for mb in range(m)], s, pp, v)
            for s in range(pp)]


def build(name: str, pp: int, m: int, v: int = 1) -> list[list[Action]]:
    if name == "gpipe":
        return gpipe(pp, m)
    if name == "1f1b":
        return one_f_one_b(pp, m)
    if name == "interleaved":
        return interleaved(pp, m, v)
    raise LayoutError(f"parallel.schedule={name!r} is unknown; choose gpipe, 1f1b or interleaved.")


def simulate(lists: list[list[Action]], f_time: float = 1.0, b_time: float = 2.0):
    """Run the lists as the executor would (sends never block, receives wait for their send) with
    unit compute times. Returns (finish time, per-stage busy time, per-stage peak in-flight
    micro-batches); raises RuntimeError on deadlock or on a receive with no matching send."""
    pp = len(lists)
    pos = [0] * pp
    clock = [0.0] * pp
    busy = [0.0] * pp
    sent: dict[tuple, float] = {}  # message -> time it was sent
    inflight = [0] * pp
    peak = [0] * pp
    while any(pos[s] < len(lists[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            while pos[s] < len(lists[s]):
                a = lists[s][pos[s]]
                if a.kind.startswith("RECV"):
                    key = message(a, s, pp)
                    if key not in sent:
                        break
                    clock[s] = max(clock[s], sent.pop(key))
                elif a.kind.startswith("SEND"):
                    sent[message(a, s, pp)] = clock[s]
                else:
                    t = f_time if a.kind == "F" else b_time
                    clock[s] += t
                    busy[s] += t
                    inflight[s] += 1 if a.kind == "F" else -1
                    peak[s] = max(peak[s], inflight[s])
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"deadlock: stages wait at "
                               f"{[lists[s][pos[s]] for s in range(pp) if pos[s] < len(lists[s])]}")
    if sent:
        raise RuntimeError(f"sends never received: {sorted(sent)[:4]}")
    return max(clock), busy, peak


def send_releases(lists: list[list[Action]]) -> list[dict[int, tuple[int, ...]]]:
    """When each send can be let go: per stage, {action index i: indices of this stage's sends that
    are certainly complete once action i is done}. A send is complete when its receiver has taken
    it; a stage learns that only from messages the receiver (or anyone who heard from it) sent
    after that receive, so this runs the lists once with vector clocks. The executor waits on those
    sends right there (never blocking: they are done) and frees their buffers, so held messages stay
    bounded by the schedule's depth, not by the number of micro-batches. Sends never known complete
    (the last ones of a step) are left out: the executor waits for them at the step's end."""
    pp = len(lists)
    receiver = {message(a, s, pp): (s, i) for s, acts in enumerate(lists)
                for i, a in enumerate(acts) if a.kind.startswith("RECV")}
    pos = [0] * pp
    known = [[0] * pp for _ in range(pp)]  # known[s][q]: how many of q's actions s knows are done
    stamps: dict[tuple, list[int]] = {}  # message -> its sender's clock at the send
    pending: list[list[tuple[int, int, int]]] = [[] for _ in range(pp)]  # (send index, receiver, its index)
    releases: list[dict[int, tuple[int, ...]]] = [{} for _ in range(pp)]
    while any(pos[s] < len(lists[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            while pos[s] < len(lists[s]):
                i, a = pos[s], lists[s][pos[s]]
                if a.kind.startswith("RECV"):
                    stamp = stamps.pop(message(a, s, pp), None)
                    if stamp is None:
                        break  # its send has not happened yet: another stage goes first
                    known[s] = [max(x, y) for x, y in zip(known[s], stamp, strict=True)]
                known[s][s] = i + 1
                if a.kind.startswith("SEND"):
                    stamps[message(a, s, pp)] = list(known[s])
                    pending[s].append((i, *receiver[message(a, s, pp)]))
                done = [p for p in pending[s] if known[s][p[1]] > p[2]]
                if done:
                    releases[s][i] = tuple(p[0] for p in done)
                    pending[s] = [p for p in pending[s] if p not in done]
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("deadlock while ordering sends (simulate() names the stuck actions)")
    return releases


def held_messages(lists: list[list[Action]], stage: int, prefetch: bool = True,
                  releases: list[dict[int, tuple[int, ...]]] | None = None) -> int:
    """The most message-sized buffers the executor holds at once on `stage` (activations sent
    or about to be, received gradients, gradients to send, posted receive buffers), walking its
    list the way pipeline/engine.py keeps them: a chunk's output lives until its send is
    released, whether or not its backward has run (the engine then frees the output of a chunk
    still awaiting its backward, which needs only the output's grad_fn; a send never released
    keeps it to the step's end); a receive buffer from its posting (one receive ahead with
    prefetch) until the forward or backward that uses it (a forward's input is then an
    activation, not a message); a gradient for the previous stage from its backward until its
    send is released. plan's pipeline memory term is this count times the message size, and the
    engine's measured peak (StepTrace.peak_message_bytes) is checked against it. `releases`:
    send_releases(lists), when the caller already has it (it covers every stage at once)."""
    pp = len(lists)
    acts = lists[stage]
    v = max(a.chunk for a in acts) + 1
    last_vs = pp * v - 1
    releases = (releases if releases is not None else send_releases(lists))[stage]
    receives = [i for i, a in enumerate(acts) if a.kind.startswith("RECV")]
    holders: dict[tuple, set] = {}  # buffer -> what holds it (a buffer lives while anything does)

    def hold(buf, by):
        holders.setdefault(buf, set()).add(by)

    def drop(buf, by):
        holders.get(buf, set()).discard(by)
        if buf in holders and not holders[buf]:
            del holders[buf]

    def post(k):
        if k < len(receives):
            a = acts[receives[k]]
            hold((a.kind, a.mb, a.chunk), "posted")

    sent_by: dict[int, tuple] = {}
    forward_only = not any(a.kind == "B" for a in acts)  # evaluation: outputs go once sent
    if prefetch:
        post(0)
    most, k = 0, 0
    for i, a in enumerate(acts):
        vs = a.chunk * pp + stage
        key = (a.mb, a.chunk)
        if a.kind.startswith("RECV"):
            if not prefetch:
                post(k)
            k += 1
            if prefetch:
                post(k)
        elif a.kind == "F":
            if vs > 0:
                drop(("RECV_F", *key), "posted")
            if vs < last_vs:
                hold(("out", *key), "outputs")
        elif a.kind == "SEND_F":
            hold(("out", *key), i)
            sent_by[i] = ("out", *key)
            if forward_only:
                drop(("out", *key), "outputs")
        elif a.kind == "B":
            if vs < last_vs:
                drop(("out", *key), "outputs")
                drop(("RECV_B", *key), "posted")
            if vs > 0:
                hold(("grad", *key), "grads")
        elif a.kind == "SEND_B":
            hold(("grad", *key), i)
            drop(("grad", *key), "grads")
            sent_by[i] = ("grad", *key)
        most = max(most, len(holders))
        for j in releases.get(i, ()):
            buf = sent_by.pop(j)
            drop(buf, j)
            if buf[0] == "out":  # the engine frees the sent output, backward or not
                drop(buf, "outputs")
    return most
