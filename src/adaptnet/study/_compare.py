"""Comparing models from a script side by side: one table, and with an output directory
``compare.json``, ``compare.md`` and ``compare.png`` (the rows a recipe's ``--vary`` gives)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.utils.data import TensorDataset

from adaptnet import _rundir, sharing
from adaptnet._io import shown
from adaptnet._table import render, table
from adaptnet.data import DataSplits
from adaptnet.errors import ConfigError
from adaptnet.report import compare_table, write_compare
from adaptnet.study._timing import headline, time_together
from adaptnet.train import config_from, evaluate, fit

__all__ = ["Comparison", "compare_models"]


@dataclass
class Comparison:
    """What :func:`compare_models` returns: one row per model, printable as a table.

    Attributes:
        rows: per model: ``variant``, ``unique_params``, ``trainable_params``,
            ``per_use_params``, ``metric`` and its ``value`` on the test data,
            ``macs`` (executed per sample), ``infer_ms_per_1k`` (batched
            inference, timed side by side), ``train_seconds``.
        report: ``compare.md`` (beside ``compare.json`` and ``compare.png``), when
            an output directory was given.
    """

    rows: list[dict[str, Any]]
    report: Path | None = None
    title: str = "compare"

    def __rich__(self) -> Table:
        head, *body = compare_table(self.rows)
        return table(self.title, head, body, numbers=range(1, len(head)))

    def __str__(self) -> str:
        return render(self)


def compare_models(models: Mapping[str, Callable[[], nn.Module]], data: Any, *,
                   out: str | Path | None = None, title: str = "compare",
                   **fit_options: Any) -> Comparison:
    """Train each model from a script, side by side, and compare them in one table.

    Args:
        models: ``{name: factory}``; each factory builds a fresh model (called
            after ``torch.manual_seed(seed)``), e.g. ``{"tied": lambda: Net(tie=True),
            "untied": lambda: Net(tie=False)}``.
        data: a :class:`adaptnet.data.DataSplits` (``adaptnet.data.load_dataset(...)``), or
            ``(train, test)`` or ``(train, val, test)`` of anything :func:`adaptnet.fit`
            reads; the test inputs are timed, so the test data is tensors, a
            ``TensorDataset`` or an iterable of ``(inputs, targets)`` batches.
        out: a directory for ``compare.json``, ``compare.md`` and ``compare.png``.
        title: the table's and the report's title.
        **fit_options: :class:`adaptnet.TrainConfig` fields for every model
            (``loss``, ``optimizer``, ``lr``, ``epochs``, ``seed``, ...).

    Raises:
        ConfigError: no models, a value that is not a factory (a model itself,
            which every variant would share), a factory that returns no
            ``nn.Module``, bad data or training options.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> result = adaptnet.compare({"small": lambda: nn.Linear(4, 2),
        ...                            "mlp": lambda: nn.Sequential(nn.Linear(4, 8),
        ...                                                         nn.ReLU(), nn.Linear(8, 2))},
        ...                           ((x, y), (x, y)), loss="cross_entropy", epochs=1)
        >>> [(r["variant"], r["unique_params"]) for r in result.rows]
        [('small', 10), ('mlp', 58)]
    """
    if not isinstance(models, Mapping) or not models:
        raise ConfigError(f"compare(): models must be a non-empty mapping {{name: factory}}, "
                          f"got {shown(models)}.")
    for name, factory in models.items():
        if isinstance(factory, nn.Module) or not callable(factory):
            raise ConfigError(f"compare(): models[{name!r}] is a {type(factory).__name__}; "
                              "give a factory that builds a fresh model, e.g. lambda: Net(), "
                              "so that no two variants share weights.")
    train, val, test = _splits(data)
    cfg = config_from(None, fit_options)
    metrics = tuple(dict.fromkeys((*cfg.resolved_metrics(), "macs")))
    rows, trained = [], {}
    for name, factory in models.items():
        torch.manual_seed(cfg.seed)
        model = factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"compare(): models[{name!r}]() returned a "
                              f"{type(model).__name__}; it must return an nn.Module.")
        start = time.perf_counter()
        fit(model, train, val=val, config=cfg)
        seconds = time.perf_counter() - start
        values = evaluate(model, test, loss=cfg.loss, metrics=metrics,
                          batch_keys=cfg.batch_keys)
        metric, value = headline(values)
        s = sharing.summary(model)
        rows.append({"variant": name, "unique_params": s.unique, "trainable_params": s.trainable,
                     "per_use_params": s.per_use, "metric": metric, "value": value,
                     "macs": values.get("macs"), "infer_ms_per_1k": 0.0,
                     "train_seconds": seconds})
        trained[name] = model
    times = time_together(trained, _inputs(test))
    for row in rows:
        row["infer_ms_per_1k"] = times[row["variant"]]
    report = None
    if out is not None:
        out = Path(out)
        _rundir.write_json(out / "compare.json", rows)
        report = write_compare(out, title)
    return Comparison(rows, report, title)


def _splits(data: Any) -> tuple[Any, Any, Any]:
    """``(train, val, test)`` of a DataSplits or a 2- or 3-tuple."""
    if isinstance(data, DataSplits):
        return data.train, data.valid, data.test
    if isinstance(data, tuple | list) and len(data) in (2, 3) and \
            not all(isinstance(d, torch.Tensor) for d in data):
        return (data[0], None, data[1]) if len(data) == 2 else tuple(data)
    size = f" of {len(data)}" if isinstance(data, tuple | list) else ""
    raise ConfigError("compare(): data must be a DataSplits (adaptnet.data.load_dataset(...)), or "
                      f"(train, test) or (train, val, test); got {type(data).__name__}{size}.")


def _inputs(test: Any, n: int = 1024) -> torch.Tensor:
    """Up to ``n`` test inputs, the batch the models are timed on."""
    if isinstance(test, TensorDataset):
        return test.tensors[0][:n]
    if isinstance(test, tuple | list) and test and isinstance(test[0], torch.Tensor):
        return test[0][:n]
    if isinstance(test, Iterable):
        taken, count = [], 0
        for batch in test:
            x = batch[0] if isinstance(batch, tuple | list) else None
            if not isinstance(x, torch.Tensor):
                break
            taken.append(x)
            count += len(x)
            if count >= n:
                break
        if taken:
            return torch.cat(taken)[:n]
    raise ConfigError("compare(): the test data must hold tensor inputs to time the models "
                      "on: tensors, a TensorDataset or (inputs, targets) batches.")
