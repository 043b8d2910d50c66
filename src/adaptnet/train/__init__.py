"""The training engine: ``fit`` and ``evaluate``, checkpoints and resume, DDP under torchrun."""

from adaptnet.train._config import TrainConfig, config_from
from adaptnet.train._evaluate import evaluate
from adaptnet.train._loop import FitResult, fit
from adaptnet.train._shard import ShardPlan, shard

__all__ = ["FitResult", "ShardPlan", "TrainConfig", "config_from", "evaluate", "fit", "shard"]
