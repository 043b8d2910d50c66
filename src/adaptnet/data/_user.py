"""The user's own data: CSV and ``.npz`` arrays, and image folders (one sub-folder per class)."""

from __future__ import annotations

import csv as _csv
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from adaptnet.data._splits import DataSplits, split_off
from adaptnet.errors import DataError, DatasetNotFoundError

__all__ = ["csv", "image_folder", "npz"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _exists(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DatasetNotFoundError(f"{what}: {p} does not exist; give the path of your data.")
    return p


def _splits(name: str, x: torch.Tensor, y: torch.Tensor, task: str, valid: float,
            test: float, seed: int, num_classes: int | None, classes: tuple[str, ...],
            test_xy: tuple[torch.Tensor, torch.Tensor] | None = None) -> DataSplits:
    if test_xy is None:
        rest, test_set = split_off(x, y, test, seed, f"{name}(test=...)")
        if test_set is None:
            raise DataError(f"{name}: test={test} leaves no test split for {len(x)} samples; "
                            "use e.g. test=0.2.")
    else:
        rest, test_set = TensorDataset(x, y), TensorDataset(*test_xy)
    train, valid_set = split_off(*rest.tensors, valid, seed + 1, f"{name}(valid=...)")
    return DataSplits(name, train, valid_set, test_set, task, tuple(x.shape[1:]),  # type: ignore[arg-type]
                      num_classes, classes)


MAX_INFERRED_CLASSES = 100


def infer_task(raw: np.ndarray, name: str) -> str:
    """``"classification"`` or ``"regression"`` from the target values; ambiguous ones refused.

    Text labels are classes; numbers with a fractional part are a regression
    target; whole numbers are classes when there are at most
    ``MAX_INFERRED_CLASSES`` of them (more look like counts or ids: refused).
    """
    try:
        values = raw.astype(np.float64)
    except ValueError:
        return "classification"
    if not np.isfinite(values).all():
        raise DataError(f"{name}: the target has non-finite values (NaN or inf); clean them "
                        "or drop those rows.")
    if (values != np.round(values)).any():
        return "regression"
    distinct = np.unique(values).size
    if distinct > MAX_INFERRED_CLASSES:
        raise DataError(f"{name}: the target has {distinct} distinct whole numbers: classes or "
                        "a quantity? Say which with task='classification' or "
                        "task='regression' (data.task in a recipe).")
    return "classification"


def _targets(raw: np.ndarray, task: str | None, name: str) -> tuple[torch.Tensor, int | None,
                                                                    tuple[str, ...], str]:
    """``(targets, number of classes, class names, task)``."""
    if task is None:
        task = infer_task(raw, name)
    if task == "classification":
        labels, y = np.unique(raw.astype(str), return_inverse=True)
        if labels.size < 2:
            raise DataError(f"{name}: a classification target needs at least two classes, got "
                            f"{labels.tolist()}.")
        if all(s.lstrip("-").isdigit() for s in labels):  # numeric labels sort as numbers
            order = np.argsort(labels.astype(int))
            labels, y = labels[order], np.argsort(order)[y]
        return (torch.from_numpy(y.astype(np.int64)), int(labels.size), tuple(labels.tolist()),
                task)
    if task == "regression":
        try:
            values = raw.astype(np.float32)
        except ValueError:
            raise DataError(f"{name}: task='regression' needs numeric targets; got values like "
                            f"{raw[:3].tolist()}. Use task='classification'.") from None
        return torch.from_numpy(values).view(len(values), -1), None, (), task
    raise DataError(f"{name}: task must be 'classification' or 'regression', got {task!r}.")


def csv(path: str | os.PathLike, *, target: str | int = -1, task: str | None = None,
        valid: float = 0.1, test: float = 0.2, seed: int = 0) -> DataSplits:
    """A CSV file with a header row: numeric feature columns and one target column.

    Args:
        target: the target column's name or index (default: the last column).
        task: ``"classification"`` (labels may be strings; classes sorted) or
            ``"regression"``; ``None`` infers it from the target (see
            :func:`infer_task`: a float target is a regression, not hundreds of
            classes).

    Raises:
        DataError: not UTF-8, no header, unknown target column, ragged or
            non-numeric rows (the message names the line and column), or a target
            whose task is ambiguous.

    Example:
        >>> import tempfile, pathlib
        >>> from adaptnet.data import csv
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
        >>> rows = [f"{i},{i % 3},{i % 2}" for i in range(40)]
        >>> _ = path.write_text("\\n".join(["a,b,label", *rows]))
        >>> d = csv(path, target="label")
        >>> d.task, d.input_shape, d.num_classes
        ('classification', (2,), 2)
    """
    p = _exists(path, "csv")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = [r for r in _csv.reader(f) if r]
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"csv: {p} is not UTF-8 text (byte {e.object[e.start]:#04x} on line "
                        f"{line}); save it as UTF-8.") from None
    except _csv.Error as e:
        raise DataError(f"csv: {p} cannot be read as CSV ({e}).") from None
    if len(rows) < 2:
        raise DataError(f"csv: {p} needs a header row and at least one data row.")
    header, body = rows[0], rows[1:]
    if isinstance(target, str):
        if target not in header:
            raise DataError(f"csv: target column {target!r} is not in {p}'s header {header}.")
        col = header.index(target)
    else:
        if not -len(header) <= target < len(header):
            raise DataError(f"csv: target column {target} is out of range for {len(header)} "
                            "columns.")
        col = target % len(header)
    feats = []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"csv: {p} line {line} has {len(row)} fields, the header has "
                            f"{len(header)}.")
        try:
            feats.append([float(v) for i, v in enumerate(row) if i != col])
        except ValueError:
            bad = next(i for i, v in enumerate(row) if i != col and not _is_float(v))
            raise DataError(f"csv: {p} line {line}, column {header[bad]!r}: {row[bad]!r} is "
                            "not a number; features must be numeric.") from None
    x = torch.tensor(feats, dtype=torch.float32)
    y, k, classes, task = _targets(np.array([r[col] for r in body]), task, "csv")
    return _splits(p.name, x, y, task, valid, test, seed, k, classes)


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def npz(path: str | os.PathLike, *, x: str = "x", y: str = "y", task: str | None = None,
        valid: float = 0.1, test: float = 0.2, seed: int = 0) -> DataSplits:
    """A NumPy ``.npz`` archive with arrays ``x`` and ``y`` (names configurable).

    If it also holds ``x_test`` and ``y_test`` those are the test split;
    otherwise ``test`` of the rows are held out. Loaded with
    ``allow_pickle=False``: an archive of object arrays is refused. ``task``
    as in :func:`csv` (inferred when ``None``).

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from adaptnet.data import npz
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.npz"
        >>> np.savez(path, x=np.random.rand(50, 6).astype("float32"), y=np.arange(50) % 3)
        >>> d = npz(path)
        >>> d.task, d.input_shape, d.num_classes
        ('classification', (6,), 3)
    """
    p = _exists(path, "npz")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError) as e:
        raise DataError(f"npz: cannot read {p} as a .npz archive of numeric arrays: {e}") from None
    missing = [k for k in (x, y) if k not in arrays]
    if missing:
        raise DataError(f"npz: {p} has no array {missing[0]!r}; it holds {sorted(arrays)}. "
                        f"Name the arrays with x=... and y=....")
    xs = torch.from_numpy(arrays[x].astype(np.float32))
    if len(xs) != len(arrays[y]):
        raise DataError(f"npz: {x!r} has {len(xs)} rows and {y!r} has {len(arrays[y])}; they "
                        "must match.")
    ys, k, classes, task = _targets(arrays[y], task, "npz")
    test_xy = None
    if f"{x}_test" in arrays and f"{y}_test" in arrays:
        yt = _targets(arrays[f"{y}_test"], task, "npz")[0]
        test_xy = (torch.from_numpy(arrays[f"{x}_test"].astype(np.float32)), yt)
    return _splits(p.name, xs, ys, task, valid, test, seed, k, classes, test_xy)


def image_folder(path: str | os.PathLike, *, size: tuple[int, int] = (28, 28),
                 channels: int = 1, valid: float = 0.1, test: float = 0.2, seed: int = 0
                 ) -> DataSplits:
    """Images in ``path/<class>/*.png`` (jpg, bmp, ...), one sub-folder per class.

    Every image is converted to ``channels`` (1: grayscale, 3: RGB), resized to
    ``size`` (height, width) and scaled to [0, 1]; classes are the sorted
    sub-folder names.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from PIL import Image
        >>> from adaptnet.data import image_folder
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for label in ("cat", "dog"):
        ...     (root / label).mkdir()
        ...     for i in range(10):
        ...         image = Image.fromarray(np.full((8, 8), 20 * i, np.uint8))
        ...         image.save(root / label / f"{i}.png")
        >>> d = image_folder(root, size=(8, 8))
        >>> d.input_shape, d.num_classes, sum(d.sizes().values())
        ((1, 8, 8), 2, 20)
    """
    try:
        from PIL import Image
    except ImportError:
        raise DatasetNotFoundError("image_folder needs Pillow (a dependency of matplotlib): "
                                   "pip install pillow.") from None
    root = _exists(path, "image_folder")
    if channels not in (1, 3):
        raise DataError(f"image_folder: channels must be 1 or 3, got {channels}.")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DataError(f"image_folder: {root} needs one sub-folder per class (at least two), "
                        f"found {classes}.")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if channels == 1 else "RGB").resize(size[::-1])
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except OSError as e:
                raise DataError(f"image_folder: cannot read {f}: {e}") from None
            xs.append(arr.reshape(size[0], size[1], channels).transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"image_folder: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}.")
    return _splits(root.name, torch.from_numpy(np.stack(xs)), torch.tensor(ys), "classification",
                   valid, test, seed, len(classes), tuple(classes))
