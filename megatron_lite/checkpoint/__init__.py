"""Checkpoints: one layout-independent checkpoint per step, committed atomically, verified before
it is read, loadable at any layout.

    manager.py    CheckpointManager (save, choose, load), write_single, convert, inspect
    store.py      the tensor store: every tensor once, under its serial name, in safetensors chunks
    integrity.py  what a checkpoint must satisfy before anything of it is read
    lock.py       one writer per run directory (RunLock)
    hf.py         Hugging Face export and import
"""

from ..errors import CheckpointError
from .integrity import file_digest, read_manifest, verify
from .lock import RunLock
from .manager import (
    CheckpointManager,
    Stateful,
    TrainState,
    convert,
    describe_layout,
    inspect,
    load_model_weights,
    resolve,
    serial_layout,
    serial_tensors,
    write_single,
)

__all__ = ["CheckpointError", "CheckpointManager", "RunLock", "Stateful", "TrainState", "convert",
           "describe_layout", "file_digest", "inspect", "load_model_weights", "read_manifest", "resolve",
           "serial_layout", "serial_tensors", "verify", "write_single"]
