"""Checkpoints through torch.distributed.checkpoint (DCP), committed atomically.

Layout of a run's checkpoint directory:
    checkpoints/
      latest                  name of the newest committed checkpoint (replaced atomically)
      step_00000100/
        .metadata, *.distcp   DCP: model + optimizer state keyed by global parameter names,
                              train state (step, data cursor in global samples, RNG states)
        config.yaml           the full run config (what `generate` and resume rebuild from)
        meta.json, tokenizer.json   the data's tokenizer, so the checkpoint is self-contained
        manifest.json         written last: step and the size of every file

A checkpoint is written into a temporary sibling directory and renamed into place only once its
manifest is on disk, so a crash mid-save never replaces or hides a good checkpoint. DCP's keys are
layout-independent (global parameter names), which later issues use to reshard between layouts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A user-visible checkpoint problem (missing, corrupt); one-sentence message."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    cursor: int = 0  # global training samples consumed (the data sampler's whole state)
    tokens: int = 0  # training tokens consumed
    consecutive_skips: int = 0  # non-finite steps in a row
    total_skips: int = 0
    extra: dict = field(default_factory=dict)

    def to_state_dict(self) -> dict:
        sd = {k: v for k, v in asdict(self).items() if k != "extra"}
        sd["extra"] = json.dumps(self.extra)
        sd["rng_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["rng_cuda"] = torch.cuda.get_rng_state()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        for k in ("step", "cursor", "tokens", "consecutive_skips", "total_skips"):
            setattr(self, k, int(sd[k]))
        self.extra = json.loads(sd["extra"])
        torch.set_rng_state(sd["rng_cpu"])
        if "rng_cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state(sd["rng_cuda"])


def _dcp():
    import torch.distributed.checkpoint as dcp
    return dcp


@contextlib.contextmanager
def _quiet():
    # DCP warns that it runs single-process when no process group exists: that is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def model_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Model (and optimizer) state keyed by parameter name, via torch's distributed state_dict API."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    # ---- discovery ----------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoints (those with a manifest), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if STEP_DIR.match(p.name) and (p / "manifest.json").is_file()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if (path / "manifest.json").is_file():
                return path
        done = self.committed()
        return done[-1] if done else None

    # ---- save -----------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, state: TrainState, config_yaml: str,
             data_dir: str | Path | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step_{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.dir))
        try:
            msd, osd = model_state(model, optimizer)
            with _quiet():
                _dcp().save({"model": msd, "optim": osd, "train": state.to_state_dict()}, checkpoint_id=str(tmp))
            (tmp / "config.yaml").write_text(config_yaml)
            if data_dir is not None:
                for name in ("meta.json", "tokenizer.json"):
                    if (Path(data_dir) / name).is_file():
                        shutil.copy2(Path(data_dir) / name, tmp / name)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            for name in files:  # data on disk before the manifest that vouches for it
                _fsync(tmp / name)
            manifest = {"step": step, "time": time.time(), "files": files, "format": 1}
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
        return final

    def _prune(self) -> None:
        done = self.committed()
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer, state: TrainState) -> None:
        verify(path)
        msd, osd = model_state(model, optimizer)
        # Ask only for train-state entries the checkpoint has (a CPU run saved no CUDA RNG state).
        saved = _dcp().FileSystemReader(str(path)).read_metadata().state_dict_metadata
        train = {k: v for k, v in state.to_state_dict().items() if f"train.{k}" in saved}
        sd = {"model": msd, "optim": osd, "train": train}
        _load_or_explain(sd, path)
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        state.load_state_dict(sd["train"])


def verify(path: Path) -> dict:
    """Check a checkpoint directory against its manifest; returns the manifest."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a committed checkpoint (no manifest.json); point to "
                              f"a step_* directory or a run's checkpoints directory.")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{str(manifest_path)!r} is corrupt; delete {str(path)!r} to fall back to "
                              f"an earlier checkpoint.") from None
    for name, size in files.items():
        f = Path(path) / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing or has the wrong size (manifest "
                                  f"says {size} bytes); delete {str(path)!r} to fall back to an earlier "
                                  f"checkpoint.")
    return manifest


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


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load only the model weights of a checkpoint (e.g. for generation)."""
    verify(path)
    msd, _ = model_state(model)
    _load_or_explain({"model": msd}, path)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, msd)


def _load_or_explain(sd: dict, path: Path) -> None:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException subclass
    try:
        with _quiet():
            _dcp().load(sd, checkpoint_id=str(path))
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
