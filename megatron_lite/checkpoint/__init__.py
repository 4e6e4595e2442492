"""Checkpoints: one layout-independent checkpoint per step, committed atomically, verified before
it is read, loadable at any layout.

    checkpoints/
      latest                   name of the newest committed checkpoint (replaced atomically)
      step_00000100/
        rank_NNNNN.safetensors the slices rank N owns of the global tensors (checkpoint/store.py):
                               model/<name>, optim/{exp_avg,exp_avg_sq,step}/<name>, rng/<kind>/<rank>
        config.yaml            the full run config (what `generate` and resume rebuild from)
        meta.json, tokenizer.json   the data's tokenizer, so the checkpoint is self-contained
        manifest.json          written last: step, layout, train state (JSON), the index of every
                               stored tensor (shape, dtype, chunks) and every file's size + xxh3

A checkpoint is written into a temporary sibling directory and renamed into place only once its
manifest is on disk, so a crash mid-save never replaces or hides a good checkpoint. Before any of
it is read, it is verified against the manifest (checkpoint/integrity.py); a resume falls back to
the newest checkpoint that verifies on every rank. Nothing is unpickled: tensors are safetensors,
everything else JSON or YAML (safe_load).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError
from ..slicing import split_of
from .integrity import HASH, STEP_DIR, describe_files, file_digest, pointer_target, read_manifest, verify
from .store import Piece, ShardWriter, Store, merge_indexes
from .store import pieces as store_pieces

__all__ = ["CheckpointError", "CheckpointManager", "Stateful", "TrainState", "describe_layout", "file_digest",
           "convert", "inspect", "load_model_weights", "read_manifest", "resolve", "verify"]
log = logging.getLogger(__name__)
DEBRIS = re.compile(r"^(\.step_\d{8,}\.tmp|step_\d{8,}\.old-\d+|latest\.tmp)$")  # of interrupted saves


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
    """What a checkpoint saves and restores besides the TrainState, handed over by the backend: the
    model, its torch optimizer, the tensor-parallel dropout stream. A backend whose weights or
    optimizer state live elsewhere (DeepSpeed's fp32 partitions) gives accessors instead; `get_*`
    may be collective (called on every rank, for every parameter, in the same order):
        get_param(p) -> full local fp32 tensor      set_param(p, tensor)
        get_state(p) -> {exp_avg, exp_avg_sq, step} set_state(p, dict)
    `state_owner` says whether this rank writes p's optimizer state (default: it holds it)."""
    model: torch.nn.Module
    optimizer: object = None
    rng_tracker: object = None
    get_param: Callable | None = None
    set_param: Callable | None = None
    get_state: Callable | None = None
    set_state: Callable | None = None
    state_owner: Callable | None = None


def local_optimizer(optimizer):
    """The optimizer whose state this rank holds: under ZeRO-1 (ZeroRedundancyOptimizer), the
    inner AdamW over this rank's share of the parameters."""
    return getattr(optimizer, "optim", optimizer) if type(optimizer).__name__ == "ZeroRedundancyOptimizer" \
        else optimizer


OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


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
        self.layout = {"tp": 1, "pp": 1, "dp": 1, "order": "tp-dp-pp", **(layout or {})}
        from ..distributed.topology import Topology
        topo = Topology(self.layout["tp"], self.layout["pp"], self.layout["dp"], self.layout["order"])
        self.coord = topo.coord(rank)
        self._pending: _PendingSave | None = None

    # ---- discovery ----------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoints (those with a manifest), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir()
                 if STEP_DIR.match(p.name) and not p.is_symlink() and (p / "manifest.json").is_file()]
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

    def save(self, step: int, model, optimizer, state: TrainState, config_yaml: str,
             data_dir: str | Path | None = None, rng_tracker=None, pieces: Stateful | None = None,
             background: bool = False) -> Path:
        """All ranks call this. `pieces` (from the backend) overrides model/optimizer/rng_tracker.
        background=True: copy this rank's slices to host memory, write them in a background thread
        and return; the commit (manifest, rename, `latest`) happens in finish(), which every rank
        calls at the same point (the trainer: the next step boundary). At most one save is in
        flight: a new save finishes the previous one first. Until it is committed, a crash leaves
        the previous checkpoint the chosen one."""
        self.finish()
        pieces = pieces or Stateful(model, optimizer, rng_tracker)
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".{final.name}.tmp"
        if self.rank == 0:
            self._remove_debris()
            tmp.mkdir(parents=True)
        self._all_ok(True)
        pending = _PendingSave(step, tmp, final, config_yaml, data_dir, TrainState(**state.to_json()))
        try:
            writer = ShardWriter(f"rank_{self.rank:05d}.safetensors", copy=background)
            self._add_tensors(writer, pieces)
            pending.index = writer.index
            if background:
                pending.thread = threading.Thread(target=pending.write, args=(writer,), daemon=True,
                                                  name=f"checkpoint-step-{step}")
                pending.thread.start()
            else:
                pending.write(writer)
        except BaseException as e:  # noqa: BLE001 - re-raised in finish(), after the other ranks know
            pending.error = e
        self._pending = pending
        return final if background else self.finish()

    def finish(self) -> Path | None:
        """Commit the save in flight, if any (all ranks call it at the same point): wait for this
        rank's write, agree that every rank's succeeded, merge indexes and checksums, commit."""
        p, self._pending = self._pending, None
        if p is None:
            return None
        if p.thread is not None:
            p.thread.join()
        error = p.error
        if error is not None:
            log.error(f"rank {self.rank} failed to write its part of checkpoint step {p.step}: {error!r}",
                      extra={"all_ranks": True})
        if not self._all_ok(error is None):
            if self.rank == 0:
                shutil.rmtree(p.tmp, ignore_errors=True)
            if error is not None:
                raise error
            raise CheckpointError(f"another rank failed to write checkpoint step {p.step}; the previous "
                                  f"checkpoint in {self.dir} is intact.")
        indexes, all_sums = [p.index], [p.sums]
        if self.group is not None:
            from ..distributed import comm
            gathered = comm.all_gather_object((p.index, p.sums), self.group)
            indexes, all_sums = [g[0] for g in gathered], [g[1] for g in gathered]
        if self.rank == 0:
            try:
                sums = {name: entry for rank_sums in all_sums for name, entry in rank_sums.items()}
                self._commit(p.step, p.tmp, p.final, p.config_yaml, p.data_dir, sums, merge_indexes(indexes),
                             p.state)
            except BaseException as e:  # noqa: BLE001
                error = e
        if not self._all_ok(error is None):
            if error is not None:
                raise error
            raise CheckpointError(f"rank 0 failed to commit checkpoint step {p.step}; the previous "
                                  f"checkpoint in {self.dir} is intact.")
        return p.final

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def _add_tensors(self, writer: ShardWriter, pieces: Stateful) -> None:
        """The slices this rank owns: a dp-rank-0 copy of every parameter (tp rank 0 for the ones
        tensor parallelism replicates; the last stage's tied copy never), the optimizer state from
        whichever rank holds it, and this rank's RNG streams."""
        model, cfg, c = pieces.model, pieces.model.config, self.coord
        tp = self.layout["tp"]
        inner = local_optimizer(pieces.optimizer) if pieces.optimizer is not None else None
        for n, p in model.named_parameters():
            replicated = split_of(n, cfg) is None
            # get_* may be collective: called for every parameter on every rank, owner or not
            value = pieces.get_param(p) if pieces.get_param else p.detach()
            if pieces.get_state:
                st = pieces.get_state(p)
            else:
                st = inner.state.get(p) if inner is not None else None
            if _is_tied_copy(model, n) or (replicated and c.tp != 0):
                continue
            if c.dp == 0:
                for piece in store_pieces("model/", n, _shape(p), cfg, tp, c.tp):
                    writer.add(piece, value)
            # Native ZeRO-1 (inner is not the optimizer): whoever holds the state; else dp rank 0.
            zero1 = inner is not pieces.optimizer
            owner = pieces.state_owner(p) if pieces.state_owner else (c.dp == 0 or zero1)
            if st and owner:
                for key in OPTIM_KEYS:
                    for piece in store_pieces(f"optim/{key}/", n, _shape(p), cfg, tp, c.tp):
                        writer.add(piece, st[key])
                step = torch.as_tensor(st["step"], dtype=torch.float32).reshape(())
                writer.add(Piece(f"optim/step/{n}", (), (), ()), step)
        rank = f"rank_{self.rank:05d}"
        streams = {"cpu": torch.get_rng_state()}
        if pieces.rng_tracker is not None:
            streams["tp"] = pieces.rng_tracker.state
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            streams["cuda"] = torch.cuda.get_rng_state()
        for kind, t in streams.items():
            writer.add(Piece(f"rng/{kind}/{rank}", tuple(t.shape), (0,), (slice(0, t.shape[0]),)), t)

    def _remove_debris(self) -> None:
        """Temp directories of interrupted saves (any step) and half-swapped old copies."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if DEBRIS.match(p.name) and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _commit(self, step: int, tmp: Path, final: Path, config_yaml: str, data_dir, shard_sums: dict,
                index: dict, state: TrainState) -> None:
        try:
            (tmp / "config.yaml").write_text(config_yaml)
            if data_dir is not None:
                for name in ("meta.json", "tokenizer.json"):
                    if (Path(data_dir) / name).is_file():
                        shutil.copy2(Path(data_dir) / name, tmp / name)
            files = {**describe_files(tmp, skip=shard_sums), **shard_sums}  # what no rank has hashed yet
            for name in ("config.yaml", "meta.json", "tokenizer.json"):
                if (tmp / name).is_file():
                    _fsync(tmp / name)  # data on disk before the manifest that vouches for it
            manifest = {"format": FORMAT, "step": step, "time": time.time(), "layout": self.layout,
                        "train": state.to_json(), "hash": HASH, "files": dict(sorted(files.items())),
                        "tensors": index}
            _write_synced(tmp / "manifest.json", json.dumps(manifest, indent=1))
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
    def load(self, path: Path, model, optimizer, state: TrainState, rng_tracker=None) -> dict:
        """Weights, then optimizer state, counters and RNG (a plain model and torch optimizer)."""
        self.load_weights(path, model)
        return self.load_state(path, Stateful(model, optimizer, rng_tracker), state)

    def _open(self, path: Path) -> tuple[dict, Store]:
        return open_store(path)

    def load_weights(self, path: Path, model) -> None:
        """Every local parameter from the regions of the stored tensors its slice covers, whatever
        layout wrote them. Runs before a backend wraps the model (DeepSpeed then builds its fp32
        masters and ZeRO-3 partitions from these weights)."""
        _, store = self._open(path)
        cfg, tp, c = model.config, self.layout["tp"], self.coord
        for n, p in model.named_parameters():
            src = "tok_emb.weight" if _is_tied_copy(model, n) else n  # read the one stored copy
            with torch.no_grad():
                store.read_into(p, store_pieces("model/", src, tuple(p.shape), cfg, tp, c.tp))

    def load_state(self, path: Path, pieces: Stateful, state: TrainState) -> dict:
        """Optimizer state (where this rank holds it), fp32 masters kept by the backend, the
        counters and the RNG streams; returns the layout the checkpoint was written with.
        At the same layout every rank gets its own RNG streams back (exact resume); at another
        layout every rank takes rank 0's default stream and keeps its freshly seeded tensor-parallel
        dropout stream (masks differ from the old layout's, as they would anyway, reproducibly)."""
        manifest, store = self._open(path)
        model, cfg, tp, c = pieces.model, pieces.model.config, self.layout["tp"], self.coord
        inner = local_optimizer(pieces.optimizer) if pieces.optimizer is not None else None
        held = {id(q) for g in inner.param_groups for q in g["params"]} if inner is not None else set()
        for n, p in model.named_parameters():
            src = "tok_emb.weight" if _is_tied_copy(model, n) else n

            def region(prefix, p=p, src=src):
                return store_pieces(prefix, src, _shape(p), cfg, tp, c.tp)
            if pieces.set_param:  # e.g. DeepSpeed's fp32 master copy (more precise than bf16 weights)
                value = torch.empty(_shape(p), dtype=torch.float32)
                store.read_into(value, region("model/"))
                pieces.set_param(p, value)
            if f"optim/step/{src}" not in store or not (pieces.set_state or id(p) in held):
                continue
            st = {"step": store.read(f"optim/step/{src}", (), ()).clone()}
            for key in OPTIM_KEYS:
                t = torch.empty(_shape(p), dtype=torch.float32)
                store.read_into(t, region(f"optim/{key}/"))
                st[key] = t.to(p.device)
            if pieces.set_state:
                pieces.set_state(p, st)
            else:
                inner.state[p] = st
        state.load_json(manifest["train"])
        mine = f"rng/cpu/rank_{self.rank:05d}"
        same = _same_layout(manifest.get("layout", {}), self.layout) and mine in store
        rank = f"rank_{self.rank:05d}" if same else "rank_00000"
        torch.set_rng_state(_read_whole(store, f"rng/cpu/{rank}"))
        if same and pieces.rng_tracker is not None and f"rng/tp/{rank}" in store:
            pieces.rng_tracker.load_state_dict({"tp_rng": _read_whole(store, f"rng/tp/{rank}")})
        if same and f"rng/cuda/{rank}" in store and torch.cuda.is_available():
            torch.cuda.set_rng_state(_read_whole(store, f"rng/cuda/{rank}"))
        return manifest.get("layout", {})


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
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def write(self, writer: ShardWriter) -> None:
        try:
            written = writer.write(self.tmp)
            if written is not None:
                _fsync(written)
                # Hashed while still in the page cache; rank 0 merges every rank's into the manifest.
                self.sums = {written.name: {"size": written.stat().st_size, HASH: file_digest(written)}}
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e


FORMAT = 3
LAYOUT_KEYS = ("tp", "pp", "dp", "order", "virtual_stages", "zero_stage", "zero_backend")


def open_store(path: Path) -> tuple[dict, Store]:
    """The manifest and tensor store of a checkpoint, after every file matched its checksum."""
    manifest = verify(path)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {manifest.get('format', 1)}, written by "
                              f"an earlier version; this version reads format {FORMAT} (start a new "
                              f"train.out_dir).")
    return manifest, Store(path, manifest["tensors"])


def _same_layout(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in LAYOUT_KEYS)


def describe_layout(layout: dict) -> str:
    return " ".join(f"{k}={layout[k]}" for k in LAYOUT_KEYS if k in layout)


def _read_whole(store: Store, key: str) -> torch.Tensor:
    shape = tuple(store.index[key]["shape"])
    return store.read(key, (0,) * len(shape), shape).clone()


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a step directory, a checkpoints directory or a run directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "manifest.json").is_file():
            return candidate
        latest = CheckpointManager(candidate).latest()
        if latest is not None:
            return latest
    raise CheckpointError(f"no committed checkpoint found at {str(path)!r}; pass a run directory "
                          f"(train.out_dir), its checkpoints/ directory or a step_* directory.")


def inspect(path: Path) -> dict:
    """What a checkpoint holds, after verifying it: step, layout, file sizes, and every stored
    tensor as {name: (global shape, dtype)} — read from the manifest, nothing deserialized."""
    manifest = verify(path)
    files = {n: (e if isinstance(e, int) else e["size"]) for n, e in manifest["files"].items()}
    tensors = {k: (e["shape"], e["dtype"]) for k, e in manifest.get("tensors", {}).items()}
    return {"path": str(path), "step": manifest.get("step"), "format": manifest.get("format", 1),
            "layout": manifest.get("layout", {}), "files": files, "tensors": {"": tensors}}


def convert(src: Path, dst_run: str | Path) -> Path:
    """A consolidated copy of checkpoint `src` — every stored tensor whole in one file, recorded as
    the serial layout — as the checkpoint of a new run directory `dst_run`. Any layout resumes it
    (as it would `src` itself); one file is what export tools and single-process users want."""
    manifest, store = open_store(src)
    serial = {"tp": 1, "pp": 1, "dp": 1, "order": "tp-dp-pp", "virtual_stages": 1, "zero_stage": 0,
              "zero_backend": "native",
              "make_vocab_divisible_by": manifest.get("layout", {}).get("make_vocab_divisible_by", 128)}
    manager = CheckpointManager(Path(dst_run) / "checkpoints", layout=serial)
    if manager.committed():
        raise CheckpointError(f"{str(dst_run)!r} already holds checkpoints; choose an empty run directory.")
    writer = ShardWriter("rank_00000.safetensors")
    for key, entry in manifest["tensors"].items():
        if key.startswith("rng/") and not key.endswith("/rank_00000"):
            continue  # other ranks' streams only matter at the layout that wrote them
        shape = tuple(entry["shape"])
        writer.add(Piece(key, shape, (0,) * len(shape), tuple(slice(0, n) for n in shape)),
                   store.read(key, (0,) * len(shape), shape))
    step = int(manifest["step"])
    final, tmp = manager.dir / f"step_{step:08d}", manager.dir / f".step_{step:08d}.tmp"
    manager._remove_debris()
    tmp.mkdir(parents=True)
    written = writer.write(tmp)
    _fsync(written)
    state = TrainState()
    state.load_json(manifest["train"])
    sums = {written.name: {"size": written.stat().st_size, HASH: file_digest(written)}}
    manager._commit(step, tmp, final, (Path(src) / "config.yaml").read_text(), Path(src), sums, writer.index,
                    state)
    return final


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
