from .trainer import Trainer, TrainingError

__all__ = ["Trainer", "TrainingError"]
