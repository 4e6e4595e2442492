"""Checkpoints through torch.distributed.checkpoint (DCP), committed atomically.

Layout of a run's checkpoint directory:
    checkpoints/
      latest                  name of the newest committed checkpoint (replaced atomically)
      step_00000100/
        .metadata, *.distcp   DCP: model + optimizer state keyed by global parameter names,
                              train state (step, data cursor in global samples, RNG states)
        config.yaml           the full run config (what `generate` and resume rebuild from)
        meta.json, tokenizer.json   the data's tokenizer, so the checkpoint is self-contained
        manifest.json         written last: step, layout, and the size and xxh3 checksum of every file

A checkpoint is written into a temporary sibling directory and renamed into place only once its
manifest is on disk, so a crash mid-save never replaces or hides a good checkpoint. Before any of
it is read, it is verified against the manifest (checkpoint/integrity.py); a resume falls back to
the newest checkpoint that verifies on every rank. DCP's keys are layout-independent (global
parameter names), which later issues use to reshard between layouts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError
from .integrity import HASH, STEP_DIR, describe_files, file_digest, pointer_target, read_manifest, verify

__all__ = ["CheckpointError", "CheckpointManager", "Stateful", "TrainState", "file_digest", "inspect",
           "load_model_weights", "read_manifest", "resolve", "verify"]
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

    def to_state_dict(self, rng_tracker=None) -> dict:
        """Counters, and the RNG streams: torch's default ones and, under tensor parallelism, the
        tp dropout stream (`rng_tracker`, parallel/random.py)."""
        sd = {k: v for k, v in asdict(self).items() if k != "extra"}
        sd["extra"] = json.dumps(self.extra)
        sd["rng_cpu"] = torch.get_rng_state()
        if rng_tracker is not None:
            sd["rng_tp"] = rng_tracker.state.clone()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["rng_cuda"] = torch.cuda.get_rng_state()
        return sd

    def load_state_dict(self, sd: dict, rng_tracker=None) -> None:
        for k in ("step", "cursor", "tokens", "consecutive_skips", "total_skips"):
            setattr(self, k, int(sd[k]))
        self.extra = json.loads(sd["extra"])
        torch.set_rng_state(sd["rng_cpu"])
        if rng_tracker is not None and "rng_tp" in sd:
            rng_tracker.load_state_dict({"tp_rng": sd["rng_tp"]})
        if "rng_cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state(sd["rng_cuda"])


@dataclass
class Stateful:
    """What a checkpoint saves and restores besides the TrainState, handed over by the backend:
    the model, its optimizer (None when `extra_save`/`extra_load` write its state themselves, as
    DeepSpeed does), and the tensor-parallel dropout stream."""
    model: torch.nn.Module
    optimizer: object = None
    rng_tracker: object = None
    extra_save: Callable[[Path], None] | None = None
    extra_load: Callable[[Path], None] | None = None


def _dcp():
    import torch.distributed.checkpoint as dcp
    return dcp


@contextlib.contextmanager
def _quiet():
    # DCP warns that it runs single-process when no process group exists: that is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def local_optimizer(optimizer):
    """The optimizer whose state this rank holds: under ZeRO-1 (ZeroRedundancyOptimizer), the
    inner AdamW over this rank's share of the parameters, saved into this rank's shard."""
    return getattr(optimizer, "optim", optimizer) if type(optimizer).__name__ == "ZeroRedundancyOptimizer" \
        else optimizer


def model_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Model (and optimizer) state keyed by parameter name, via torch's distributed state_dict API."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, local_optimizer(optimizer))


class CheckpointManager:
    """Saves and finds a run's checkpoints. With several processes, every rank writes its own
    DCP shard into rank_NNNNN/ of the same step directory, rank 0 commits the whole step, and the
    manifest records the layout (tp, pp, dp) it was written with."""

    def __init__(self, directory: str | Path, keep: int = 2, rank: int = 0, group=None,
                 layout: dict | None = None):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = rank
        self.group = group  # all ranks that write one checkpoint (None: a single process)
        self.layout = layout or {"tp": 1, "pp": 1, "dp": 1}
        world = self.layout["tp"] * self.layout["pp"] * self.layout["dp"]
        self.shard = f"rank_{rank:05d}" if world > 1 else ""

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

    def _mine(self, name: str) -> bool:
        """Files this rank reads: the shared ones and its own shard (everything when serial)."""
        return not self.shard or not name.startswith("rank_") or name.startswith(self.shard + "/")

    def choose(self) -> Path | None:
        """The newest checkpoint that verifies on every rank (each checks the files it will read;
        one all-reduce per candidate makes the choice the same everywhere). A damaged newer one is
        reported in a warning naming the file."""
        for path in reversed(self.committed()):
            try:
                verify(path, self._mine)
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
             data_dir: str | Path | None = None, extra_save=None, rng_tracker=None) -> Path:
        """All ranks call this. `optimizer` None: its state is saved by `extra_save(step_dir)`
        (e.g. DeepSpeed's own checkpoint of its partitioned optimizer), which every rank runs."""
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".{final.name}.tmp"
        if self.rank == 0:
            self._remove_debris()
            tmp.mkdir(parents=True)
        self._all_ok(True)
        error: BaseException | None = None
        try:
            msd, osd = model_state(model, optimizer)
            shard = tmp / self.shard
            sd = {"model": msd, "train": state.to_state_dict(rng_tracker)}
            if osd is not None:
                sd["optim"] = osd
            with _quiet():
                _dcp().save(sd, checkpoint_id=str(shard), no_dist=True)
            if extra_save is not None:
                extra_save(tmp)
            for f in sorted(shard.iterdir()):
                _fsync(f)
            _fsync(shard)
            # Hash what this rank wrote while it is still in the page cache (rank 0 merges them).
            sums = describe_files(tmp, shard) if self.shard else {}
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error, sums = e, {}
        if not self._all_ok(error is None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None:
                raise error
            raise CheckpointError(f"another rank failed to write checkpoint step {step}; the previous "
                                  f"checkpoint in {self.dir} is intact.")
        if self.group is not None:
            from ..distributed import comm
            gathered = comm.all_gather_object(sums, self.group)
            sums = {name: entry for rank_sums in gathered for name, entry in rank_sums.items()}
        if self.rank == 0:
            try:
                self._commit(step, tmp, final, config_yaml, data_dir, sums)
            except BaseException as e:  # noqa: BLE001
                error = e
        if not self._all_ok(error is None):
            if error is not None:
                raise error
            raise CheckpointError(f"rank 0 failed to commit checkpoint step {step}; the previous "
                                  f"checkpoint in {self.dir} is intact.")
        return final

    def _remove_debris(self) -> None:
        """Temp directories of interrupted saves (any step) and half-swapped old copies."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if DEBRIS.match(p.name) and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _commit(self, step: int, tmp: Path, final: Path, config_yaml: str, data_dir,
                shard_sums: dict) -> None:
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
            manifest = {"step": step, "time": time.time(), "files": dict(sorted(files.items())),
                        "layout": self.layout, "format": 2, "hash": HASH}
            _write_synced(tmp / "manifest.json", json.dumps(manifest, indent=2))
            _fsync(tmp)
            if final.exists():  # re-saving a step (e.g. after a skipped-step rerun): swap safely
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
    @staticmethod
    def check_layout(path: Path, layout: dict) -> None:
        """A checkpoint resumes only at the (tp, pp, dp) layout that wrote it (for now)."""
        saved = read_manifest(path).get("layout", {"tp": 1, "pp": 1, "dp": 1})
        if ({k: saved.get(k, 1) for k in ("tp", "pp", "dp")}
                != {k: layout.get(k, 1) for k in ("tp", "pp", "dp")}):
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written with layout tp={saved.get('tp', 1)} "
                f"pp={saved.get('pp', 1)} dp={saved.get('dp', 1)}; resume with the same "
                f"parallel.tp/pp/dp (resharding to another layout is not available yet).")

    def load(self, path: Path, model, optimizer, state: TrainState, extra_load=None,
             rng_tracker=None) -> None:
        verify(path, self._mine)  # nothing is deserialized before its checksum matches
        self.check_layout(path, self.layout)
        shard = path / self.shard
        msd, osd = model_state(model, optimizer)
        # Ask only for train-state entries the checkpoint has (a CPU run saved no CUDA RNG state).
        saved = _dcp().FileSystemReader(str(shard)).read_metadata().state_dict_metadata
        train = {k: v for k, v in state.to_state_dict(rng_tracker).items() if f"train.{k}" in saved}
        sd = {"model": msd, "train": train}
        if osd is not None:
            sd["optim"] = osd
        _load_or_explain(sd, shard)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
        if optimizer is not None:
            set_state_dict(model, local_optimizer(optimizer), model_state_dict=sd["model"],
                           optim_state_dict=sd["optim"])
        else:
            set_model_state_dict(model, sd["model"])
        state.load_state_dict(sd["train"], rng_tracker)
        if extra_load is not None:
            extra_load(path)


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
    """What a checkpoint holds, after verifying it: step, layout, file sizes, and every DCP
    directory's tensors as {name: (shape, dtype)} (the local shards under tensor parallelism)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    manifest = verify(path)
    files = {n: (e if isinstance(e, int) else e["size"]) for n, e in manifest["files"].items()}
    shards = sorted({n.split("/")[0] if "/" in n and n.startswith("rank_") else "" for n in files
                     if n.endswith(".metadata")})
    tensors = {}
    for shard in shards:
        meta = _dcp().FileSystemReader(str(Path(path) / shard)).read_metadata().state_dict_metadata
        tensors[shard] = {k: (list(m.size), str(m.properties.dtype).replace("torch.", ""))
                          for k, m in sorted(meta.items()) if isinstance(m, TensorStorageMetadata)}
    return {"path": str(path), "step": manifest.get("step"), "format": manifest.get("format", 1),
            "layout": manifest.get("layout", {}), "files": files, "tensors": tensors}


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under `prefix.` in one DCP directory, allocated from its metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    meta = _dcp().FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
           if k.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata)}
    _load_or_explain(out, path)
    return {k[len(prefix) + 1:]: v for k, v in out.items()}


def load_model_weights(path: Path, model: torch.nn.Module, verified: bool = False) -> None:
    """Load only the model weights of a checkpoint into a serial model (e.g. for generation);
    a tensor-parallel checkpoint is consolidated from its rank shards. Every file is checked
    against the manifest first (unless the caller just did: verified=True)."""
    manifest = read_manifest(path) if verified else verify(path)
    layout = manifest.get("layout", {"tp": 1, "pp": 1, "dp": 1})
    if layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1) == 1:
        weights = read_tensors(path, "model")
    else:
        from ..distributed.topology import Topology
        from ..parallel.tensor_parallel import consolidate
        topo = Topology(layout["tp"], layout["pp"], layout["dp"], layout.get("order", "tp-dp-pp"))
        weights = {}
        for stage in range(layout["pp"]):  # data-parallel replica 0: one full model
            shards = [read_tensors(path / f"rank_{topo.rank_of(tp=t, pp=stage, dp=0):05d}", "model")
                      for t in range(layout["tp"])]
            part = consolidate(shards, model.config) if layout["tp"] > 1 else shards[0]
            weights.update(part)
        if model.config.tie_embeddings and "tok_emb.weight" in weights:
            weights["lm_head.weight"] = weights["tok_emb.weight"]
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model "
                              f"({' '.join(str(e).split())[:160]}); "
                              f"use the config.yaml stored with it (a ZeRO-3 checkpoint holds partitioned "
                              f"weights that only DeepSpeed can load).") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); use the config.yaml stored with it.")


def _load_or_explain(sd: dict, path: Path) -> None:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException subclass
    try:
        with _quiet():
            _dcp().load(sd, checkpoint_id=str(path), no_dist=True)  # each rank reads its own shard
    except (Exception, CheckpointException) as e:
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model or is damaged ({first}); "
                              f"use its config.yaml, or a new train.out_dir to start afresh.") from None


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
