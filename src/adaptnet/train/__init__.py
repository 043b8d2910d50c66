"""The training engine: ``fit``, ``evaluate``, checkpoints and resume, DDP under torchrun."""

from adaptnet.train._config import TrainConfig
from adaptnet.train._loop import FitResult, evaluate, fit

__all__ = ["FitResult", "TrainConfig", "evaluate", "fit"]
