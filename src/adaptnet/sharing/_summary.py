"""Parameter accounting that knows about ties: unique vs per-use counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rich.console import Group
from rich.text import Text
from torch import nn
from torch.nn.utils import parametrize

from adaptnet._table import render, table
from adaptnet.sharing._discover import TieGroup, ties
from adaptnet.sharing._slots import Slot, group_by_tensor, iter_slots, relative_transform

__all__ = ["ModuleRow", "Summary", "summary"]


@dataclass(frozen=True)
class ModuleRow:
    """Parameters held directly by one module path.

    Attributes:
        name: module path (``""`` for the root).
        type: class name.
        per_use: elements in its parameter slots (a tensor it holds twice counts twice).
        unique: elements of the tensors first seen here (each tensor is counted
            in exactly one row, so the column sums to the model's unique total).
        trainable: of ``unique``, those with ``requires_grad``.
        shared: ``"attr = other.path"`` for each slot holding a tensor first
            seen elsewhere (``"attr = other.pathᵀ"`` for a transposed view).
    """

    name: str
    type: str
    per_use: int
    unique: int
    trainable: int
    shared: tuple[str, ...]

    @property
    def frozen(self) -> int:
        """Of ``unique``, those without ``requires_grad``."""
        return self.unique - self.trainable


@dataclass(frozen=True)
class Summary:
    """Tie-aware parameter counts of a model; ``print()`` it or read the fields.

    Attributes:
        model: the model's class name.
        rows: one :class:`ModuleRow` per module path that holds parameters.
        unique: elements in distinct tensors: what memory and checkpoints hold.
        per_use: elements counted once per slot: what the layers see.
        trainable: unique elements with ``requires_grad``.
        frozen: unique elements without.
        bytes: memory of the distinct tensors.
        groups: the tie groups (see :func:`adaptnet.ties`).
    """

    model: str
    rows: tuple[ModuleRow, ...]
    unique: int
    per_use: int
    trainable: int
    frozen: int
    bytes: int
    groups: tuple[TieGroup, ...]

    @property
    def saving_ratio(self) -> float:
        """per_use / unique: how many times more parameters the layers see than exist."""
        return self.per_use / self.unique if self.unique else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "saving_ratio": self.saving_ratio}

    def __rich__(self) -> Group:
        # "per use" and "shares" appear once something is shared, "frozen" once something
        # is frozen: a column that would repeat another, or stay empty, is left out
        shared, frozen = bool(self.groups) or self.per_use != self.unique, self.frozen > 0

        def cells(name: str, type_: str, per_use: str, unique: str, trainable: str,
                  frozen_: str, shares: str) -> tuple[str, ...]:
            return (name, type_, *([per_use] if shared else []), unique, trainable,
                    *([frozen_] if frozen else []), *([shares] if shared else []))

        header = cells("module", "type", "per use", "unique", "trainable", "frozen", "shares")
        rows = [cells(r.name or "(root)", r.type, f"{r.per_use:,}", f"{r.unique:,}",
                      f"{r.trainable:,}", f"{r.frozen:,}", "\n".join(r.shared))
                for r in self.rows]
        total = cells("total", "", f"{self.per_use:,}", f"{self.unique:,}",
                      f"{self.trainable:,}", f"{self.frozen:,}", "")
        out = table(f"{self.model}: parameters", header, [*rows, total],
                    numbers=range(2, len(header) - int(shared)), words=range(len(header)))
        if len(out.rows) > 1:
            out.rows[-2].end_section = True  # a rule above the total
        return Group(out, Text(self._caption()))

    def _caption(self) -> str:
        declared = sum(all(m.declared for m in g.members) for g in self.groups)
        return (f"unique {self.unique:,} · per use {self.per_use:,} · saving "
                f"{self.saving_ratio:.2f}× · trainable {self.trainable:,} · frozen "
                f"{self.frozen:,} · {_size(self.bytes)} · {len(self.groups)} shared group(s), "
                f"{declared} declared")

    def __str__(self) -> str:
        """The table as plain text at the terminal's width (``COLUMNS``)."""
        return render(self)


def summary(model: nn.Module) -> Summary:
    """Count a model's parameters once per distinct tensor, and once per use.

    Unlike counters that sum ``p.numel()`` over every module (torchinfo 1.8
    reports 32,272 for a 16,272-parameter LM whose head is tied to its
    embedding), a tied tensor counts once in ``unique``/``trainable``/``bytes``
    and once per slot in ``per_use``. Modules shared under several paths
    appear once per path.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> layer = nn.Linear(8, 8)
        >>> s = adaptnet.summary(nn.Sequential(layer, nn.ReLU(), layer))
        >>> s.unique, s.per_use
        (72, 144)
        >>> row = s.rows[0]  # a ModuleRow per module path
        >>> isinstance(row, adaptnet.sharing.ModuleRow), row.name
        (True, '0')
    """
    slots = list(iter_slots(model))
    first_of: dict[int, Slot] = {}  # id(slot) -> the slot that first held its tensor
    unique_slots = []
    for group in group_by_tensor(slots):
        unique_slots.append(group[0])
        for s in group:
            first_of[id(s)] = group[0]
    first_ids = {id(s) for s in unique_slots}

    rows: dict[str, dict] = {}
    for s in slots:
        row = rows.setdefault(s.module_path, {"type": _type_name(s.module), "per_use": 0,
                                              "unique": 0, "trainable": 0, "shared": []})
        n = s.tensor.numel()
        row["per_use"] += n
        if id(s) in first_ids:
            row["unique"] += n
            row["trainable"] += n if s.tensor.requires_grad else 0
        else:
            first = first_of[id(s)]
            mark = "ᵀ" if relative_transform(s, first) else ""
            row["shared"].append(f"{s.attr} = {first.name}{mark}")
    unique = sum(s.tensor.numel() for s in unique_slots)
    trainable = sum(s.tensor.numel() for s in unique_slots if s.tensor.requires_grad)
    return Summary(
        model=type(model).__name__,
        rows=tuple(ModuleRow(name, r["type"], r["per_use"], r["unique"], r["trainable"],
                             tuple(r["shared"])) for name, r in rows.items()),
        unique=unique,
        per_use=sum(s.tensor.numel() for s in slots),
        trainable=trainable,
        frozen=unique - trainable,
        bytes=sum(s.tensor.numel() * s.tensor.element_size() for s in unique_slots),
        groups=tuple(ties(model)),
    )


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return (cls.__bases__[0] if parametrize.is_parametrized(module) else cls).__name__


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
