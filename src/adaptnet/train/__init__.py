"""The training engine: ``fit`` and ``evaluate``, checkpoints and resume, DDP under torchrun."""

from adaptnet.train._config import TrainConfig
from adaptnet.train._evaluate import evaluate
from adaptnet.train._loop import FitResult, fit

__all__ = ["FitResult", "TrainConfig", "evaluate", "fit"]
