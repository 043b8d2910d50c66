"""Evaluation: loss and metrics in eval mode, without gradients."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet._io import shown
from adaptnet.dynamic import count_macs
from adaptnet.errors import ConfigError
from adaptnet.train._config import METRICS
from adaptnet.train._data import Source
from adaptnet.train._data import source as data_source
from adaptnet.train._losses import LOSSES, LossFn, statistic, unpack

__all__ = ["evaluate", "run_evaluation"]


def evaluate(model: nn.Module, data: Any, *, loss: str | LossFn = "mse",
             metrics: tuple[str, ...] = ("loss",), batch_size: int = 256,
             batch_keys: tuple[str, str] | None = None) -> dict[str, Any]:
    """Loss and metrics of ``model`` on ``data`` in eval mode, without gradients.

    Metrics: ``loss``, ``accuracy``, ``perplexity`` (exp of the cross-entropy),
    ``steps`` (mean executed depth of a ``DepthResult``), ``macs`` (mean
    multiply-adds executed per sample, from :func:`adaptnet.count_macs`),
    ``exits`` (fraction of samples leaving at each exit of an ``ExitResult``).

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> values = adaptnet.evaluate(nn.Linear(3, 2), (x, y), loss="cross_entropy",
        ...                            metrics=("loss", "accuracy", "macs"))
        >>> sorted(values), values["macs"]  # 3 x 2 multiply-adds per sample
        (['accuracy', 'loss', 'macs'], 6.0)
    """
    if not callable(loss) and not (isinstance(loss, str) and loss in LOSSES):
        raise ConfigError(f"evaluate(): unknown loss {shown(loss)}; expected one of "
                          f"{', '.join(LOSSES)}, or a (prediction, target) -> scalar function.")
    if not isinstance(metrics, tuple | list):
        raise ConfigError(f"evaluate(): metrics must be a tuple of names, e.g. ('loss', "
                          f"'accuracy'), got {shown(metrics)}.")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"evaluate(): unknown metric(s) {', '.join(map(shown, unknown))}; "
                          f"metrics is a tuple of {', '.join(METRICS)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"evaluate(): batch_size must be a positive int, got "
                          f"{shown(batch_size)}.")
    fn = loss if callable(loss) else LOSSES[loss]
    source = data_source(data, "data", keys=batch_keys, batch_size=batch_size, reads=1,
                         caller="evaluate()")
    return run_evaluation(model, source, fn, tuple(metrics), batch_size, torch.device("cpu"))



def run_evaluation(model: nn.Module, data: Source, fn: LossFn, metrics: tuple[str, ...],
              batch_size: int, device: torch.device) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    total, count, correct, steps, macs = 0.0, 0, 0, 0.0, 0
    exits: torch.Tensor | None = None
    with torch.no_grad():
        for x, y in data.in_order(batch_size, device):
            if "macs" in metrics:
                with count_macs() as counted:
                    raw = model(x)
                macs += counted.total
            else:
                raw = model(x)
            task, _, pred, out = unpack(raw, y, fn, False)
            total += float(task) * len(y)
            count += len(y)
            if "accuracy" in metrics:
                correct += int((pred.argmax(-1) == y).sum())
            counted = statistic(out, "steps") if "steps" in metrics else None
            if counted is not None:
                steps += float(counted.double().sum())
            index = statistic(out, "exit_index") if "exits" in metrics else None
            if index is not None:
                counts = torch.bincount(index.cpu())
                exits = counts if exits is None else _add(exits, counts)
    model.train(was_training)
    if count == 0:
        raise ConfigError(f"evaluate(): {data.what} yielded no batch.")
    values: dict[str, Any] = {"loss": total / count}
    if "accuracy" in metrics:
        values["accuracy"] = correct / count
    if "perplexity" in metrics:
        values["perplexity"] = math.exp(min(values["loss"], 700))
    if "steps" in metrics:
        values["steps"] = steps / count
    if "macs" in metrics:
        values["macs"] = macs / count
    if "exits" in metrics and exits is not None:
        values["exits"] = {str(i): float(c) / count for i, c in enumerate(exits.tolist())}
    return values

def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(len(a), len(b))
    return F.pad(a, (0, n - len(a))) + F.pad(b, (0, n - len(b)))
