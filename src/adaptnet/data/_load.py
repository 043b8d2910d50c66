"""``load``: a dataset by name or path, optionally turned into pairs or an autoencoding task."""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from adaptnet.data._builtin import digits, fashion_mnist, mnist1d, parity, regression
from adaptnet.data._splits import DataSplits
from adaptnet.data._text import shakespeare
from adaptnet.data._user import csv, image_folder, npz
from adaptnet.errors import DataError

__all__ = ["DATASETS", "TRANSFORMS", "autoencode", "load_dataset", "pairs"]

#: The datasets ``load`` knows by name (built in, and the file loaders).
DATASETS: dict[str, Callable[..., DataSplits]] = {
    "digits": digits, "mnist1d": mnist1d, "fashion_mnist": fashion_mnist,
    "shakespeare": shakespeare, "parity": parity, "regression": regression,
    "csv": csv, "npz": npz, "image_folder": image_folder,
}
#: What ``load_dataset(..., transform=)`` can make of a dataset: Siamese pairs, or x -> x.
TRANSFORMS = ("pairs", "autoencode")


def load_dataset(name: str | os.PathLike, *, transform: str | None = None, **options: Any
                 ) -> DataSplits:
    """A dataset by name (``"mnist1d"``, ...) or path (``.csv``, ``.npz``, an image folder).

    Args:
        name: a key of :data:`DATASETS`, or a file/folder path.
        transform: ``"pairs"`` (Siamese: inputs ``(2, ...)``, target 1 when both
            samples share a class) or ``"autoencode"`` (the target is the input).
        **options: the dataset function's keyword arguments.

    Raises:
        DataError: unknown name, transform or option (with the accepted ones).
        DatasetNotFoundError: the data is not on disk; the message says how to get it.

    Example:
        >>> import adaptnet.data
        >>> data = adaptnet.data.load_dataset("parity", bits=4, train_size=64, test_size=16)
        >>> data.input_shape, data.num_classes, data.sizes()
        ((4,), 2, {'train': 58, 'valid': 6, 'test': 16})
        >>> "parity" in adaptnet.data.DATASETS, adaptnet.data.TRANSFORMS
        (True, ('pairs', 'autoencode'))
    """
    fn, path = _resolve(name)
    params = inspect.signature(fn).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        accepted = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
        raise DataError(f"dataset {fn.__name__!r}: unknown option(s) {', '.join(unknown)}; it "
                        f"accepts {', '.join(accepted)}.")
    data = fn(path, **options) if path is not None else fn(**options)
    if transform is None:
        return data
    if transform == "pairs":
        return pairs(data)
    if transform == "autoencode":
        return autoencode(data)
    raise DataError(f"unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)}.")


def _resolve(name: str | os.PathLike) -> tuple[Callable[..., DataSplits], Path | None]:
    text = str(name)
    if text in DATASETS and text not in ("csv", "npz", "image_folder"):
        return DATASETS[text], None
    p = Path(text)
    if p.suffix == ".csv":
        return csv, p
    if p.suffix == ".npz":
        return npz, p
    if p.is_dir():
        return image_folder, p
    names = [k for k in DATASETS if k not in ("csv", "npz", "image_folder")]
    close = difflib.get_close_matches(text, names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(f"unknown dataset {text!r}.{hint} Built in: "
                    f"{', '.join(names)}; or give a .csv file, a .npz file or an image folder.")


def pairs(data: DataSplits, seed: int = 0) -> DataSplits:
    """Siamese pairs from a classification dataset: half same-class, half different.

    Each split of ``N`` samples becomes ``N`` pairs ``(2, ...)``: sample ``i``
    with a random sample of its class (even ``i``) or of another class (odd
    ``i``); the target is 1 for same-class pairs, else 0.

    Example:
        >>> from adaptnet.data import digits, pairs
        >>> d = pairs(digits())  # (x1, x2) stacked, target 1 when both show the same digit
        >>> d.input_shape, d.num_classes
        ((2, 64), 2)
    """
    if data.task != "classification":
        raise DataError(f"transform 'pairs' needs a classification dataset; {data.name!r} is "
                        f"{data.task}.")
    g = torch.Generator().manual_seed(seed)

    def make(split: TensorDataset | None) -> TensorDataset | None:
        if split is None:
            return None
        x, y = split.tensors
        n = len(y)
        r = torch.randint(0, 2**62, (n,), generator=g)
        same = torch.arange(n) % 2 == 0
        by_class = {int(c): (y == c).nonzero().squeeze(1) for c in y.unique()}
        partner = torch.empty(n, dtype=torch.long)
        others = {c: (y != c).nonzero().squeeze(1) for c in by_class}
        for i in range(n):
            pool = by_class[int(y[i])] if same[i] or len(others[int(y[i])]) == 0 \
                else others[int(y[i])]
            partner[i] = pool[int(r[i]) % len(pool)]
        return TensorDataset(torch.stack([x, x[partner]], 1), (y == y[partner]).long())

    return DataSplits(f"{data.name}-pairs", make(data.train), make(data.valid), make(data.test),
                      "classification", (2, *data.input_shape), 2, ("different", "same"))


def autoencode(data: DataSplits) -> DataSplits:
    """The same inputs, with the input as the target (mean squared error).

    Example:
        >>> from adaptnet.data import autoencode, digits
        >>> d = autoencode(digits())  # the inputs are the targets
        >>> d.task, d.loss
        ('autoencode', 'mse')
    """

    def make(split: TensorDataset | None) -> TensorDataset | None:
        return None if split is None else TensorDataset(split.tensors[0], split.tensors[0])

    if data.task == "language_model":
        raise DataError("transform 'autoencode' needs real-valued inputs; token ids are not.")
    return DataSplits(f"{data.name}-autoencode", make(data.train), make(data.valid),
                      make(data.test), "autoencode", data.input_shape)
