"""Training: the loop (trainer), the backends, metrics; cli adds `megatron-lite train`. Names
resolve lazily (lazy.py), so registering the sub-parser does not import torch."""

from ..errors import TrainingError
from ..lazy import lazy_names

_WHERE = {"Backend": "backends", "StepOutcome": "backends", "build_backend": "backends", "Trainer": "trainer"}
__all__ = ["Backend", "StepOutcome", "Trainer", "TrainingError", "build_backend"]
__getattr__ = lazy_names(__name__, _WHERE)
