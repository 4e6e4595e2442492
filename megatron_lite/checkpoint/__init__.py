"""Checkpoints: one layout-independent checkpoint per step, committed atomically, verified before
it is read, loadable at any layout.

    manager.py    CheckpointManager (save, choose, load), write_single, convert, inspect
    store.py      the tensor store: every tensor once, under its serial name, in safetensors chunks
    integrity.py  what a checkpoint must satisfy before anything of it is read
    lock.py       one writer per run directory (RunLock)
    hf.py         Hugging Face export and import
    cli.py        `megatron-lite checkpoint verify|inspect|convert|export|import`

Names resolve lazily (lazy.py), so registering the sub-parser does not import torch.
"""

from ..errors import CheckpointError
from ..lazy import lazy_names

_EXPORTS = {
    "integrity": ["file_digest", "read_manifest", "verify"],
    "lock": ["RunLock"],
    "manager": ["CheckpointManager", "Stateful", "TrainState", "convert", "describe_layout", "inspect",
                "load_model_weights", "resolve", "serial_layout", "serial_tensors", "write_single"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["CheckpointError", "CheckpointManager", "RunLock", "Stateful", "TrainState", "convert",
           "describe_layout", "file_digest", "inspect", "load_model_weights", "read_manifest", "resolve",
           "serial_layout", "serial_tensors", "verify", "write_single"]
__getattr__ = lazy_names(__name__, _WHERE)
