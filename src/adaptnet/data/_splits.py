"""What every dataset builder returns, and the deterministic split it uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import TensorDataset

from adaptnet.errors import DataError

__all__ = ["DataSplits", "Task", "split_off"]

Task = Literal["classification", "regression", "language_model", "autoencode"]


@dataclass(frozen=True)
class DataSplits:
    """A dataset as in-memory tensors, split three ways.

    The splits are ``TensorDataset`` of ``(inputs, targets)``, so they go straight
    to :func:`adaptnet.fit`; on 2 CPU cores indexing tensors is faster than any
    ``DataLoader`` with workers, and every built-in dataset fits in memory.

    Attributes:
        name: the dataset's name (``"mnist1d"``, or the file it came from).
        train, valid, test: the splits; ``valid`` is ``None`` when ``valid=0``.
        task: what the targets are (decides the default loss).
        input_shape: one sample's input shape, e.g. ``(40,)`` or ``(1, 28, 28)``.
        num_classes: classes (classification) or vocabulary size (language
            model); ``None`` for regression.
        classes: class names or the vocabulary, where known.
    """

    name: str
    train: TensorDataset
    valid: TensorDataset | None
    test: TensorDataset
    task: Task
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    classes: tuple[str, ...] = field(default=(), repr=False)

    @property
    def loss(self) -> str:
        """The loss that fits the task: cross-entropy for classes and tokens, else MSE."""
        return "cross_entropy" if self.task in ("classification", "language_model") else "mse"

    def sizes(self) -> dict[str, int]:
        """Samples per split."""
        return {k: len(v) if v is not None else 0
                for k, v in (("train", self.train), ("valid", self.valid), ("test", self.test))}


def split_off(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int, what: str
              ) -> tuple[TensorDataset, TensorDataset | None]:
    """``(rest, held_out)``: ``fraction`` of the rows held out, by a permutation seeded ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"{what}: the held-out fraction must lie in [0, 1), got {fraction!r}; "
                        "e.g. valid=0.1.")
    n_out = round(len(x) * fraction)
    if n_out == 0:
        return TensorDataset(x, y), None
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    rest, out = order[n_out:], order[:n_out]
    return TensorDataset(x[rest], y[rest]), TensorDataset(x[out], y[out])
