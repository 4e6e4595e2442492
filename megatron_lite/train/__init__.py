from ..errors import TrainingError
from .backends import Backend, StepOutcome, build_backend
from .trainer import Trainer

__all__ = ["Backend", "StepOutcome", "Trainer", "TrainingError", "build_backend"]
