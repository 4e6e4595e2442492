"""Checkpoints: one layout-independent checkpoint per step, committed atomically, verified before
it is read, loadable at any layout.

    checkpoints/
      latest                   name of the newest committed checkpoint (replaced atomically)
      step_00000100/
        rank_NNNNN.safetensors the slices rank N owns of the global tensors (checkpoint/store.py):
                               model/<name>, optim/{exp_avg,exp_avg_sq,step}/<name>, rng/<kind>/<rank>
        config.yaml            the full run config (what `generate` and resume rebuild from)
        meta.json, tokenizer.json   the data's tokenizer, so the checkpoint is self-contained
        manifest.json          step, layout, train state (JSON), the index of every stored tensor
                               (shape, dtype, chunks) and every file's size + xxh3
        manifest.xxh3          the manifest's own checksum, written last

A checkpoint is written into a temporary sibling directory and renamed into place only once its
manifest is on disk, so a crash mid-save, or a full disk, never replaces or hides a good checkpoint.
Before any of it is read, it is verified against the manifest (checkpoint/integrity.py); a resume
falls back to the newest checkpoint that verifies on every rank. Nothing is unpickled: tensors are
safetensors, everything else JSON or YAML (safe_load).

Two ways in: CheckpointManager.save (every rank of a job, each writing the slices it owns of a
backend's Stateful) and write_single (one process writing whole tensors: `checkpoint convert`, HF
import). Both end in the same commit.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..errors import CheckpointError
from ..slicing import split_of
from .integrity import (
    DIGEST,
    FORMAT,
    HASH,
    MANIFEST,
    STEP_DIR,
    describe_files,
    file_digest,
    manifest_digest,
    pointer_target,
    verify,
)
from .lock import RunLock
from .store import Piece, ShardWriter, Store, merge_indexes
from .store import pieces as store_pieces

log = logging.getLogger(__name__)
DEBRIS = re.compile(r"^(\.step_\d{8,}\.tmp|step_\d{8,}\.old-\d+|latest\.tmp)$")  # of interrupted saves
OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
LAYOUT_KEYS = ("tp", "pp", "dp", "ep", "order", "virtual_stages", "zero_stage", "zero_backend")
LAYOUT_DEFAULTS = {"ep": 1}  # what a manifest written before the key existed meant
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    cursor: int = 0  # global training samples consumed (the data sampler's whole state)
    tokens: int = 0  # training tokens consumed
    consecutive_skips: int = 0  # non-finite steps in a row
    total_skips: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def load_json(self, d: dict) -> None:
        for k in ("step", "cursor", "tokens", "consecutive_skips", "total_skips"):
            setattr(self, k, int(d[k]))
        self.extra = dict(d.get("extra", {}))


@dataclass
class Stateful:
    """What a checkpoint saves and restores besides the TrainState, handed over by the backend:
        model        this rank's part of the model
        optimizer    the torch optimizer holding this rank's AdamW state (under native ZeRO-1 the
                     local one over this rank's share), or None when get_state/set_state stand in
        rng_tracker  the tensor-parallel dropout stream
        state_owner(p) -> whether this rank writes p's optimizer state: the backend says so when it
                     shards that state (native ZeRO-1: the rank holding it); None: every dp rank
                     holds a copy and dp rank 0 writes it.
    A backend whose weights or optimizer state live elsewhere (DeepSpeed's fp32 partitions) gives
    accessors; `get_*` may be collective (called on every rank, for every parameter, in order):
        get_param(p) -> full local fp32 tensor      set_param(p, tensor)
        get_state(p) -> {exp_avg, exp_avg_sq, step} set_state(p, dict)"""
    model: torch.nn.Module
    optimizer: object = None
    rng_tracker: object = None
    state_owner: Callable[[torch.nn.Parameter], bool] | None = None
    get_param: Callable | None = None
    set_param: Callable | None = None
    get_state: Callable | None = None
    set_state: Callable | None = None

    def state_of(self, p) -> dict | None:
        """p's AdamW state on this rank (None where this rank holds none)."""
        if self.get_state is not None:
            return self.get_state(p)
        return self.optimizer.state.get(p) if self.optimizer is not None else None

    def holds_state(self) -> Callable[[torch.nn.Parameter], bool]:
        """Which parameters' state a load restores on this rank."""
        if self.set_state is not None:
            return lambda p: True
        held = {id(q) for g in self.optimizer.param_groups for q in g["params"]} if self.optimizer else set()
        return lambda p: id(p) in held


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's local shape (ZeRO-3 leaves an empty tensor in place and keeps it in ds_shape)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _is_tied_copy(model, name: str) -> bool:
    """The last pipeline stage's copy of a tied embedding: stored once, as tok_emb.weight."""
    return model.config.tie_embeddings and name == "lm_head.weight" and not model.has_embed


class CheckpointManager:
    """Saves and finds a run's checkpoints. Every rank writes the slices it owns into its own
    safetensors file of the same step directory; rank 0 merges the ranks' indexes and checksums
    into the manifest and commits the step. `layout` is Layout.as_dict() of the writing run."""

    def __init__(self, directory: str | Path, keep: int = 2, rank: int = 0, group=None,
                 layout: dict | None = None):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = rank
        self.group = group  # all ranks that write one checkpoint (None: a single process)
        self.layout = {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "order": "tp-dp-pp", **(layout or {})}
        from ..distributed.topology import Topology
        topo = Topology(self.layout["tp"], self.layout["pp"], self.layout["dp"], self.layout["order"],
                        self.layout["cp"], self.layout["ep"])
        self.coord = topo.coord(rank)
        self.ep_rank, self.edp_rank = topo.ep_rank(self.coord), topo.edp_rank(self.coord)
        self._pending: _PendingSave | None = None

    # ---- discovery ----------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoints (those with a manifest), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir()
                 if STEP_DIR.match(p.name) and not p.is_symlink() and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest committed checkpoint (its manifest is written before the rename, so the
        newest committed directory is complete even when a crash beat the `latest` pointer)."""
        pointer_target(self.dir)  # a pointer that leaves the directory is refused, not followed
        done = self.committed()
        return done[-1] if done else None

    def choose(self) -> Path | None:
        """The newest checkpoint that verifies on every rank (one all-reduce per candidate makes the
        choice the same everywhere). A damaged newer one is reported in a warning naming the file."""
        for path in reversed(self.committed()):
            try:
                verify(path)
                bad = 0.0
            except CheckpointError as e:
                log.warning(f"warning: {e}", extra={"all_ranks": True})
                bad = 1.0
            if self.group is not None:
                from ..distributed import comm
                flag = torch.tensor([bad])
                comm.all_reduce(flag, self.group, op="max")
                bad = flag.item()
            if not bad:
                return path
            log.warning(f"warning: checkpoint {str(path)!r} is unusable; falling back to an earlier one")
        return None

    # ---- save -----------------------------------------------------------------------------
    def _all_ok(self, ok: bool) -> bool:
        """True iff every rank reports ok (doubles as a barrier)."""
        if self.group is None:
            return ok
        from ..distributed import comm
        flag = torch.tensor([1.0 if ok else 0.0])
        comm.all_reduce(flag, self.group)
        return int(flag.item()) == comm.size(self.group)

    def save(self, step: int, stateful: Stateful, state: TrainState, config_yaml: str,
             data_dir: str | Path | None = None, background: bool = False) -> Path:
        """All ranks call this with their backend's Stateful. background=True: copy this rank's
        slices to host memory, write them in a background thread and return; the commit (manifest,
        rename, `latest`) happens in finish(), which every rank calls at the same point (the trainer:
        the next step boundary). At most one save is in flight: a new save finishes the previous one
        first. Until it is committed, a crash or a full disk leaves the previous checkpoint the
        chosen one."""
        pending = self._begin(step, state, config_yaml, data_dir)
        writer = ShardWriter(f"rank_{self.rank:05d}.safetensors", copy=background)
        try:
            self._add_tensors(writer, stateful)
        except BaseException as e:  # noqa: BLE001 - re-raised in finish(), after the other ranks know
            pending.error = e
        return self._write(pending, writer, background)

    def _begin(self, step: int, state: TrainState, config_yaml: str, data_dir) -> _PendingSave:
        """Finish the save in flight; rank 0 makes the new step's temporary directory."""
        self.finish()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".{final.name}.tmp"
        if self.rank == 0:
            self._remove_debris()
            tmp.mkdir(parents=True)
        self._all_ok(True)
        return _PendingSave(step, tmp, final, config_yaml, data_dir, TrainState(**state.to_json()))

    def _write(self, pending: _PendingSave, writer: ShardWriter, background: bool) -> Path:
        """Write this rank's file now or in a background thread; commit now unless background."""
        pending.index = writer.index
        pending.need = writer.nbytes + (_shared_bytes(pending) if self.rank == 0 else 0)
        if pending.error is None and background:
            pending.thread = threading.Thread(target=pending.write, args=(writer,), daemon=True,
                                              name=f"checkpoint-step-{pending.step}")
            pending.thread.start()
        elif pending.error is None:
            pending.write(writer)
        self._pending = pending
        return pending.final if background else self.finish()

    def finish(self) -> Path | None:
        """Commit the save in flight, if any (all ranks call it at the same point): wait for this
        rank's write, agree that every rank's succeeded, merge indexes and checksums, commit."""
        p, self._pending = self._pending, None
        if p is None:
            return None
        if p.thread is not None:
            p.thread.join()
        error = p.error
        if error is not None and self.group is not None:  # the other ranks only learn that one failed
            log.error(f"rank {self.rank} failed to write its part of checkpoint step {p.step}: {error!r}",
                      extra={"all_ranks": True})
        if not self._all_ok(error is None):
            if self.rank == 0:
                shutil.rmtree(p.tmp, ignore_errors=True)
            self._fail(p, error, "another rank failed to write")
        indexes, all_sums = [p.index], [p.sums]
        if self.group is not None:
            from ..distributed import comm
            gathered = comm.all_gather_object((p.index, p.sums), self.group)
            indexes, all_sums = [g[0] for g in gathered], [g[1] for g in gathered]
        if self.rank == 0:
            try:
                sums = {name: entry for rank_sums in all_sums for name, entry in rank_sums.items()}
                self._commit(p, sums, merge_indexes(indexes))
            except BaseException as e:  # noqa: BLE001
                error = e
        if not self._all_ok(error is None):
            self._fail(p, error, "rank 0 failed to commit")
        return p.final

    def _fail(self, p: _PendingSave, error: BaseException | None, what: str):
        """Raise why save `p` was not committed: this rank's error (a full disk in one sentence), or
        that another rank failed."""
        if error is None:
            raise CheckpointError(f"{what} checkpoint step {p.step}; the previous checkpoint in {self.dir} "
                                  f"is intact.")
        if not _no_space(error):
            raise error
        free = shutil.disk_usage(self.dir).free
        previous = self.latest()
        kept = (f"the previous checkpoint {str(previous)!r} is intact and stays the one a rerun resumes "
                f"from" if previous is not None else "no earlier checkpoint exists")
        raise CheckpointError(f"the disk of {str(self.dir)!r} is full: checkpoint step {p.step} needs about "
                              f"{_size(p.need)} and {_size(free)} are free, so nothing of it was committed; "
                              f"{kept} (free at least {_size(max(p.need - free, 0))} more on that disk or "
                              f"choose a train.out_dir on another one, then rerun).") from None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def _add_tensors(self, writer: ShardWriter, s: Stateful) -> None:
        """The slices this rank owns: a dp-rank-0 copy of every parameter (tp rank 0 for the ones
        tensor parallelism replicates; the last stage's tied copy never), the optimizer state where
        the backend says this rank owns it, and this rank's RNG streams."""
        model, cfg, c = s.model, s.model.config, self.coord
        for n, p in model.named_parameters():
            split = split_of(n, cfg)
            expert = split is not None and split.axis == "ep"  # split over ep, replicated over tp
            # get_* may be collective: called for every parameter on every rank, owner or not
            value = s.get_param(p) if s.get_param else p.detach()
            st = s.state_of(p)
            if _is_tied_copy(model, n) or ((split is None or expert) and c.tp != 0):
                continue
            # the first replica writes: dp rank 0 of cp rank 0, the cp ranks of a replica holding the
            # same weights (experts: the first holder of each ep rank's share)
            first = self.edp_rank == 0 if expert else c.dp == 0 and c.cp == 0
            if first:
                for piece in self._pieces("model/", n, _shape(p), cfg):
                    writer.add(piece, value)
            if st and (s.state_owner(p) if s.state_owner else first):
                for key in OPTIM_KEYS:
                    for piece in self._pieces(f"optim/{key}/", n, _shape(p), cfg):
                        writer.add(piece, st[key])
                step = torch.as_tensor(st["step"], dtype=torch.float32).reshape(())
                writer.add(Piece(f"optim/step/{n}", (), (), ()), step)
        rank = f"rank_{self.rank:05d}"
        streams = {"cpu": torch.get_rng_state()}
        if s.rng_tracker is not None:
            streams["tp"] = s.rng_tracker.state
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            streams["cuda"] = torch.cuda.get_rng_state()
        for kind, t in streams.items():
            writer.add(_whole(f"rng/{kind}/{rank}", t), t)

    def _pieces(self, prefix: str, name: str, shape: tuple[int, ...], cfg) -> list[Piece]:
        """Where this rank's local tensor of `name` sits in the stored tensors (its tp and ep slices)."""
        return store_pieces(prefix, name, shape, cfg, self.layout["tp"], self.coord.tp, self.layout["ep"],
                            self.ep_rank)

    def _remove_debris(self) -> None:
        """Temp directories of interrupted saves (any step) and half-swapped old copies."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if DEBRIS.match(p.name) and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _commit(self, p: _PendingSave, shard_sums: dict, index: dict) -> None:
        """Rank 0: the shared files, the manifest and its checksum, then the rename and `latest`."""
        tmp, final = p.tmp, p.final
        try:
            (tmp / "config.yaml").write_text(p.config_yaml)
            if p.data_dir is not None:
                for name in ("meta.json", "tokenizer.json"):
                    if (Path(p.data_dir) / name).is_file():
                        shutil.copy2(Path(p.data_dir) / name, tmp / name)
            files = {**describe_files(tmp, skip=shard_sums), **shard_sums}  # what no rank has hashed yet
            for name in ("config.yaml", "meta.json", "tokenizer.json"):
                if (tmp / name).is_file():
                    _fsync(tmp / name)  # data on disk before the manifest that vouches for it
            manifest = {"format": FORMAT, "step": p.step, "time": time.time(), "layout": self.layout,
                        "train": p.state.to_json(), "hash": HASH, "files": dict(sorted(files.items())),
                        "tensors": index}
            text = json.dumps(manifest, indent=1)
            _write_synced(tmp / MANIFEST, text)
            _write_synced(tmp / DIGEST, manifest_digest(text.encode()))
            _fsync(tmp)
            if final.exists():  # re-saving a step (e.g. after a fallback): swap safely
                old = final.with_name(final.name + f".old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync(self.dir)
        _write_synced(self.dir / "latest.tmp", final.name)
        os.replace(self.dir / "latest.tmp", self.dir / "latest")
        _fsync(self.dir)
        self._prune()

    def _prune(self) -> None:
        done = self.committed()
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------
    def load(self, path: Path, stateful: Stateful, state: TrainState) -> dict:
        """Weights, then optimizer state, counters and RNG."""
        self.load_weights(path, stateful.model)
        return self.load_state(path, stateful, state)

    def load_weights(self, path: Path, model) -> None:
        """Every local parameter from the regions of the stored tensors its slice covers, whatever
        layout wrote them. Runs before a backend wraps the model (DeepSpeed then builds its fp32
        masters and ZeRO-3 partitions from these weights)."""
        _, store = open_store(path)
        cfg = model.config
        for n, p in model.named_parameters():
            src = "tok_emb.weight" if _is_tied_copy(model, n) else n  # read the one stored copy
            with torch.no_grad():
                store.read_into(p, self._pieces("model/", src, tuple(p.shape), cfg))

    def load_state(self, path: Path, stateful: Stateful, state: TrainState) -> dict:
        """Optimizer state (where this rank holds it), fp32 masters kept by the backend, the
        counters and the RNG streams; returns the layout the checkpoint was written with.
        At the same layout every rank gets its own RNG streams back (exact resume); at another
        layout every rank takes rank 0's default stream and keeps its freshly seeded tensor-parallel
        dropout stream (masks differ from the old layout's, as they would anyway, reproducibly)."""
        manifest, store = open_store(path)
        s = stateful
        model, cfg = s.model, s.model.config
        holds = s.holds_state()
        for n, p in model.named_parameters():
            src = "tok_emb.weight" if _is_tied_copy(model, n) else n

            def region(prefix, p=p, src=src):
                return self._pieces(prefix, src, _shape(p), cfg)
            if s.set_param:  # e.g. DeepSpeed's fp32 master copy (more precise than bf16 weights)
                value = torch.empty(_shape(p), dtype=torch.float32)
                store.read_into(value, region("model/"))
                s.set_param(p, value)
            if f"optim/step/{src}" not in store or not holds(p):
                continue
            st = {"step": store.read(f"optim/step/{src}", (), ()).clone()}
            for key in OPTIM_KEYS:
                t = torch.empty(_shape(p), dtype=torch.float32)
                store.read_into(t, region(f"optim/{key}/"))
                st[key] = t.to(p.device)
            if s.set_state:
                s.set_state(p, st)
            else:
                s.optimizer.state[p] = st
        state.load_json(manifest["train"])
        self._load_rng(manifest, store, s)
        return manifest["layout"]

    def _load_rng(self, manifest: dict, store: Store, s: Stateful) -> None:
        mine = f"rng/cpu/rank_{self.rank:05d}"
        same = _same_layout(manifest["layout"], self.layout) and mine in store
        rank = f"rank_{self.rank:05d}" if same else "rank_00000"
        torch.set_rng_state(_read_whole(store, f"rng/cpu/{rank}"))
        if same and s.rng_tracker is not None and f"rng/tp/{rank}" in store:
            s.rng_tracker.load_state_dict({"tp_rng": _read_whole(store, f"rng/tp/{rank}")})
        if same and f"rng/cuda/{rank}" in store and torch.cuda.is_available():
            torch.cuda.set_rng_state(_read_whole(store, f"rng/cuda/{rank}"))


@dataclass
class _PendingSave:
    """One rank's part of a save between the snapshot and the commit."""
    step: int
    tmp: Path
    final: Path
    config_yaml: str
    data_dir: object
    state: TrainState
    index: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)
    need: int = 0  # bytes this rank writes
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def write(self, writer: ShardWriter) -> None:
        try:
            if shutil.disk_usage(self.tmp).free < self.need:  # refuse before filling the disk
                raise OSError(errno.ENOSPC, "not enough free space for the checkpoint")
            written = writer.write(self.tmp)
            if written is not None:
                _fsync(written)
                # Hashed while still in the page cache; rank 0 merges every rank's into the manifest.
                self.sums = {written.name: {"size": written.stat().st_size, HASH: file_digest(written)}}
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e


def _shared_bytes(p: _PendingSave) -> int:
    """What rank 0 writes besides its tensors: the config and the data's tokenizer files."""
    extra = [Path(p.data_dir) / n for n in ("meta.json", "tokenizer.json")] if p.data_dir is not None else []
    return len(p.config_yaml.encode()) + sum(f.stat().st_size for f in extra if f.is_file())


def _no_space(e: BaseException) -> bool:
    """A write failed for want of space: an OSError's errno, or the `os error N` safetensors' writer
    (Rust) puts into its message, its only trace of the errno."""
    if isinstance(e, OSError):
        return e.errno in NO_SPACE
    m = re.search(r"\(os error (\d+)\)", str(e))
    return m is not None and int(m.group(1)) in NO_SPACE


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def open_store(path: Path) -> tuple[dict, Store]:
    """The manifest and tensor store of a checkpoint, after every file matched its checksum."""
    manifest = verify(path)
    return manifest, Store(path, manifest["tensors"])


def _same_layout(a: dict, b: dict) -> bool:
    a, b = {**LAYOUT_DEFAULTS, **a}, {**LAYOUT_DEFAULTS, **b}
    return all(a.get(k) == b.get(k) for k in LAYOUT_KEYS)


def describe_layout(layout: dict) -> str:
    layout = {**LAYOUT_DEFAULTS, **layout}
    return " ".join(f"{k}={layout[k]}" for k in LAYOUT_KEYS if k in layout)


def _whole(key: str, t: torch.Tensor) -> Piece:
    """All of tensor t, stored as `key`."""
    return Piece(key, tuple(t.shape), (0,) * t.dim(), tuple(slice(0, n) for n in t.shape))


def _read_whole(store: Store, key: str) -> torch.Tensor:
    shape = tuple(store.index[key]["shape"])
    return store.read(key, (0,) * len(shape), shape).clone()


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a step directory, a checkpoints directory or a run directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / MANIFEST).is_file():
            return candidate
        latest = CheckpointManager(candidate).latest()
        if latest is not None:
            return latest
    raise CheckpointError(f"no committed checkpoint found at {str(path)!r}; pass a run directory "
                          f"(train.out_dir), its checkpoints/ directory or a step_* directory.")


def printable(text: str) -> str:
    """`text` safe to print on a terminal: every non-printable character (an escape sequence's
    ESC, a newline) as its Python escape."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def inspect(path: Path) -> dict:
    """What a checkpoint holds, after verifying it: step, layout, file sizes, and every stored
    tensor as {name: (global shape, dtype)} — read from the manifest, nothing deserialized; every
    string from the checkpoint made printable."""
    manifest = verify(path)
    files = {n: e["size"] for n, e in manifest["files"].items()}
    tensors = {printable(k): (e["shape"], e["dtype"]) for k, e in manifest["tensors"].items()}
    layout = {printable(k): printable(v) if isinstance(v, str) else v for k, v in manifest["layout"].items()}
    return {"path": printable(path), "step": manifest["step"], "format": manifest["format"],
            "layout": layout, "files": files, "tensors": {"": tensors}}


def serial_layout(make_vocab_divisible_by: int = 128, order: str = "tp-dp-pp") -> dict:
    """The layout a single writer records: one process, no ZeRO."""
    return {"tp": 1, "pp": 1, "dp": 1, "order": order, "virtual_stages": 1, "zero_stage": 0,
            "zero_backend": "native", "make_vocab_divisible_by": make_vocab_divisible_by}


def serial_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A serial model's weights under their stored names (fused blocks apart, as every layout
    stores them), then this process's RNG stream: what write_single stores for a model."""
    for n, p in model.named_parameters():
        for piece in store_pieces("model/", n, tuple(p.shape), model.config, 1, 0):
            yield piece.key, p.detach()[piece.local]
    yield "rng/cpu/rank_00000", torch.get_rng_state()


def write_single(run_dir: str | Path, step: int, tensors: Iterable[tuple[str, torch.Tensor]],
                 state: TrainState, config_yaml: str, data_dir: str | Path | None = None,
                 layout: dict | None = None) -> Path:
    """The single-writer commit (`checkpoint convert`, HF import): `tensors`, (stored name, whole
    tensor) pairs (model/…, optim/…, rng/…) taken only once the run directory is known to be free,
    become checkpoint `step` of the new run directory `run_dir`, recorded as `layout` (default:
    serial), through the same commit as every save. Refused when run_dir already holds checkpoints
    or another process holds its lock."""
    run_dir = Path(run_dir)
    manager = CheckpointManager(run_dir / "checkpoints", layout=layout or serial_layout())

    def refuse_if_used() -> None:
        if manager.committed():
            raise CheckpointError(f"{str(run_dir)!r} already holds checkpoints; choose an empty run "
                                  f"directory.")
    refuse_if_used()  # before anything is written
    with RunLock(run_dir):
        refuse_if_used()  # a run that started meanwhile
        writer = ShardWriter("rank_00000.safetensors")
        for key, t in tensors:
            writer.add(_whole(key, t), t)
        return manager._write(manager._begin(step, state, config_yaml, data_dir), writer, background=False)


def convert(src: Path, dst_run: str | Path) -> Path:
    """A consolidated copy of checkpoint `src` — every stored tensor whole in one file, recorded as
    the serial layout — as the checkpoint of a new run directory `dst_run`. Any layout resumes it
    (as it would `src` itself); one file is what export tools and single-process users want."""
    manifest, store = open_store(src)
    tensors = ((key, _read_whole(store, key)) for key in manifest["tensors"]
               # other ranks' streams only matter at the layout that wrote them
               if not (key.startswith("rng/") and not key.endswith("/rank_00000")))
    state = TrainState()
    state.load_json(manifest["train"])
    layout = serial_layout(manifest["layout"].get("make_vocab_divisible_by", 128))
    return write_single(dst_run, manifest["step"], tensors, state, (Path(src) / "config.yaml").read_text(),
                        data_dir=src, layout=layout)


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the weights of a checkpoint of any layout into a serial model (e.g. for generation);
    every file is checked against the manifest first."""
    CheckpointManager(Path(path).parent).load_weights(path, model)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
