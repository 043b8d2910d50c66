"""Built-in datasets from installed packages or files on disk; nothing is downloaded."""

from __future__ import annotations

import gzip
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from adaptnet.data._splits import DataSplits, split_off
from adaptnet.errors import DataError, DatasetNotFoundError

__all__ = ["FASHION_MNIST_DIR", "digits", "fashion_mnist", "mnist1d", "parity", "regression"]

#: Where Debian's dataset-fashion-mnist puts Fashion-MNIST (read from there, never fetched).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def _need(module: str, dataset: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DatasetNotFoundError(
            f"dataset {dataset!r} needs the {module.split('.')[0]!r} package, which is not "
            "installed; install adaptnet's data extra: pip install 'adaptnet[data]'.") from None


def digits(*, valid: float = 0.1, test: float = 0.2, seed: int = 0, image: bool = False
           ) -> DataSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 samples, 10 classes), scaled to [0, 1].

    Args:
        valid, test: fractions held out (test first, then valid from the rest).
        seed: seeds the split.
        image: inputs ``(1, 8, 8)`` instead of ``(64,)``.

    Example:
        >>> from adaptnet.data import digits
        >>> d = digits()
        >>> d.sizes(), d.input_shape, d.num_classes
        ({'train': 1294, 'valid': 144, 'test': 359}, (64,), 10)
    """
    bunch = _need("sklearn.datasets", "digits").load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    if image:
        x = x.view(-1, 1, 8, 8)
    rest, test_set = split_off(x, y, test, seed, "digits(test=...)")
    if test_set is None:
        raise DataError("digits: test=0 leaves no test split; use e.g. test=0.2.")
    train, valid_set = split_off(*rest.tensors, valid, seed + 1, "digits(valid=...)")
    return DataSplits("digits", train, valid_set, test_set, "classification",
                      tuple(x.shape[1:]), 10, tuple(str(i) for i in range(10)))


@lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int) -> tuple[np.ndarray, ...]:
    data_mod = _need("mnist1d.data", "mnist1d")
    args = data_mod.get_dataset_args()
    args.seed = seed
    state = np.random.get_state(), random.getstate()
    try:  # make_dataset seeds numpy's and Python's global generators; put them back
        d = data_mod.make_dataset(args)
    finally:
        np.random.set_state(state[0])
        random.setstate(state[1])
    return d["x"], d["y"], d["x_test"], d["y_test"]


def mnist1d(*, valid: float = 0.0, seed: int = 42) -> DataSplits:
    """MNIST-1D (Greydanus 2020): 4,000 train / 1,000 test signals of length 40, 10 classes.

    Generated locally with ``mnist1d.data.make_dataset`` and the package's
    default arguments (seed 42 gives the published dataset), never downloaded.
    Building it takes a few seconds; it is cached per process.

    Args:
        valid: fraction of the 4,000 training signals held out for validation
            (0 keeps the paper's 4,000/1,000 split).
        seed: the generator's seed.

    Example:
        >>> from adaptnet.data import mnist1d
        >>> d = mnist1d()
        >>> d.sizes(), d.input_shape
        ({'train': 4000, 'valid': 0, 'test': 1000}, (40,))
    """
    x, y, xt, yt = (torch.tensor(a) for a in _mnist1d_arrays(seed))
    train, valid_set = split_off(x.float(), y.long(), valid, seed, "mnist1d(valid=...)")
    return DataSplits("mnist1d", train, valid_set, TensorDataset(xt.float(), yt.long()),
                      "classification", (40,), 10, tuple(str(i) for i in range(10)))


def _idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4]!r}); "
                        "use the original Fashion-MNIST files.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: its header says {dims}, it holds {data.size} "
                        "values; fetch the file again.")
    return data.reshape(dims)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DatasetNotFoundError(
        f"fashion_mnist: {stem}[.gz] is not in {data_dir}. Install the files with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; they go to "
        f"{FASHION_MNIST_DIR}), or download the four idx files from "
        "https://github.com/zalandoresearch/fashion-mnist and pass data_dir=THAT_DIR.")


def fashion_mnist(*, data_dir: str | os.PathLike | None = None, valid: float = 0.1,
                  seed: int = 0, classes: list[int] | None = None,
                  train_per_class: int | None = None) -> DataSplits:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 images, 10 classes.

    Read from the idx files in ``data_dir`` (default
    ``/usr/share/datasets/fashion-mnist``, Debian's ``dataset-fashion-mnist``).

    Args:
        valid: fraction of the training images held out for validation.
        seed: seeds the split and the per-class subsample.
        classes: keep only these classes, relabelled ``0..len(classes)-1`` in order.
        train_per_class: keep this many training images per class (a small
            labelled budget), chosen with ``seed``.

    Raises:
        DatasetNotFoundError: the files are not there; the message says how to get them.

    Example:
        >>> from adaptnet.data import fashion_mnist
        >>> d = fashion_mnist(classes=[0, 1], train_per_class=50)  # Debian's dataset-fashion-mnist
        >>> d.sizes()["train"], d.input_shape
        (100, (1, 28, 28))
    """
    root = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    arrays = [_idx(_find(root, f"{s}-{k}-idx{d}-ubyte"))
              for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    x, y, xt, yt = (torch.from_numpy(a.copy()) for a in arrays)
    x, xt = (t.float().div_(255.0).unsqueeze(1) for t in (x, xt))
    y, yt = y.long(), yt.long()
    names = FASHION_CLASSES
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < 10]
        if bad or len(set(classes)) != len(classes) or not classes:
            raise DataError(f"fashion_mnist: classes must be distinct labels in 0..9, got "
                            f"{classes!r}.")
        lut = torch.full((10,), -1, dtype=torch.long)
        lut[torch.tensor(classes)] = torch.arange(len(classes))
        keep, keep_t = lut[y] >= 0, lut[yt] >= 0
        x, y, xt, yt = x[keep], lut[y[keep]], xt[keep_t], lut[yt[keep_t]]
        names = tuple(FASHION_CLASSES[c] for c in classes)
    train, valid_set = split_off(x, y, valid, seed, "fashion_mnist(valid=...)")
    if train_per_class is not None:
        train = _per_class(train, train_per_class, len(names), seed)
    return DataSplits("fashion_mnist", train, valid_set, TensorDataset(xt, yt),
                      "classification", (1, 28, 28), len(names), names)


def _per_class(data: TensorDataset, n: int, k: int, seed: int) -> TensorDataset:
    x, y = data.tensors
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(k):
        rows = (y == c).nonzero().squeeze(1)
        if len(rows) < n:
            raise DataError(f"train_per_class={n}, but class {c} has only {len(rows)} training "
                            "samples.")
        picks.append(rows[torch.randperm(len(rows), generator=g)[:n]])
    idx = torch.cat(picks)
    return TensorDataset(x[idx], y[idx])


def parity(*, bits: int = 8, train_size: int = 20_000, test_size: int = 2_000,
           valid: float = 0.1, seed: int = 0) -> DataSplits:
    """The parity task of PonderNet (Banino et al. 2021) and ACT (Graves 2016).

    Each input has ``bits`` entries; a random number (1 to ``bits``) of random
    positions are set to +1 or -1, the rest are 0. The target is 1 when the
    number of +1 entries is odd. Binary classification (2 classes).

    Example:
        >>> from adaptnet.data import parity
        >>> d = parity(bits=4, train_size=100, test_size=20)
        >>> d.sizes(), d.num_classes
        ({'train': 90, 'valid': 10, 'test': 20}, 2)
    """
    if bits < 1 or train_size < 1 or test_size < 1:
        raise DataError(f"parity: bits, train_size and test_size must be >= 1, got {bits}, "
                        f"{train_size}, {test_size}.")
    g = torch.Generator().manual_seed(seed)
    n = train_size + test_size
    count = torch.randint(1, bits + 1, (n, 1), generator=g)
    ranks = torch.rand(n, bits, generator=g).argsort(1).argsort(1)
    signs = torch.randint(0, 2, (n, bits), generator=g) * 2 - 1
    x = torch.where(ranks < count, signs, 0).float()
    y = ((x == 1).sum(1) % 2).long()
    train, valid_set = split_off(x[:train_size], y[:train_size], valid, seed,
                                 "parity(valid=...)")
    return DataSplits("parity", train, valid_set, TensorDataset(x[train_size:], y[train_size:]),
                      "classification", (bits,), 2, ("even", "odd"))


def regression(*, features: int = 10, train_size: int = 1_000, test_size: int = 200,
               noise: float = 0.1, valid: float = 0.1, seed: int = 0) -> DataSplits:
    """Synthetic regression: ``y = sum_i sin(w_i x_i) + x_0 x_1 + noise``, shape ``(1,)``.

    Inputs are standard normal; ``w`` is drawn once from the seed. Fits the
    textbook 10 -> 50 -> 1 network.

    Example:
        >>> from adaptnet.data import regression
        >>> d = regression(features=3, train_size=50, test_size=10)
        >>> d.task, d.loss, d.input_shape
        ('regression', 'mse', (3,))
    """
    if features < 2:
        raise DataError(f"regression: features must be >= 2, got {features}.")
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(features, generator=g) * 2 + 0.5
    x = torch.randn(train_size + test_size, features, generator=g)
    y = (torch.sin(w * x).sum(1) + x[:, 0] * x[:, 1]).unsqueeze(1)
    y = y + noise * torch.randn(y.shape, generator=g)
    train, valid_set = split_off(x[:train_size], y[:train_size], valid, seed,
                                 "regression(valid=...)")
    return DataSplits("regression", train, valid_set,
                      TensorDataset(x[train_size:], y[train_size:]), "regression", (features,))
