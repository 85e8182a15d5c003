"""Training: the step (step), the run's state (state), the loop (trainer), optimizer (optim), metrics,
checkpoints and run folders (runs). Exports ``Trainer``, ``evaluate`` and the checkpoint loaders."""

from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .metrics import evaluate
from .trainer import Trainer, TrainingStopped

__all__ = ["CheckpointError", "Trainer", "TrainingStopped", "evaluate", "load_checkpoint", "load_model",
           "save_checkpoint"]
