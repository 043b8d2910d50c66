"""Slots: every place a module holds a tensor, named as the user sees it.

A *slot* is one (module, attribute) that holds a parameter or buffer. A tensor
tied k times fills k slots. Slots are named logically: the member of a
transposed tie is ``decoder.weight`` (transform ``"transpose"``), not
PyTorch's internal ``decoder.parametrizations.weight.original``.

Traversal visits shared modules once per path (like
``named_modules(remove_duplicate=False)``), so per-use counts come for free.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from adaptnet._tree import join, matches, suggest, walk
from adaptnet.errors import SelectionError
from adaptnet.sharing._registry import Transposed, compose


@dataclass(frozen=True, eq=False)
class Slot:
    """One use of a tensor: ``module.<attr>`` at logical path ``name``."""

    name: str
    module_path: str
    module: nn.Module
    attr: str
    tensor: torch.Tensor  # the stored tensor (the owner's, for a transposed member)
    transform: str | None  # how the module sees ``tensor``
    is_buffer: bool

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape as the module sees it (after the transform)."""
        shape = tuple(self.tensor.shape)
        return shape[::-1] if self.transform == "transpose" else shape




def ours(module: nn.Module, attr: str) -> bool:
    """Whether ``module.attr`` is the member of an adaptnet transposed tie."""
    if not parametrize.is_parametrized(module, attr):
        return False
    plist = module.parametrizations[attr]
    return len(plist) == 1 and isinstance(plist[0], Transposed)




def iter_slots(model: nn.Module, *, buffers: bool = False) -> Iterator[Slot]:
    """Yield every parameter slot (and persistent buffer slot if ``buffers``).

    A slot is one place a module holds a tensor, named as the user sees it (a
    transposed tie's member is ``decoder.weight``, transform ``"transpose"``);
    a tensor tied or shared k times fills k slots, and :func:`group_by_tensor`
    gathers them: the unique-tensor view that counting, initialisation,
    optimizer groups and freezing use.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> layer = nn.Linear(2, 2)
        >>> slots = list(adaptnet.sharing.iter_slots(nn.Sequential(layer, layer)))
        >>> [s.name for s in slots], len(adaptnet.sharing.group_by_tensor(slots))
        (['0.weight', '0.bias', '1.weight', '1.bias'], 2)
    """
    for path, module in walk(model):
        for attr, p in module._parameters.items():
            if p is not None:
                yield Slot(join(path, attr), path, module, attr, p, None, False)
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if ours(module, attr):
                    yield Slot(join(path, attr), path, module, attr, plist.original, "transpose",
                               False)
                    continue
                # Someone else's parametrization: its originals are real, stored tensors.
                inner = join(path, f"parametrizations.{attr}")
                for pname, p in plist._parameters.items():
                    yield Slot(join(inner, pname), inner, plist, pname, p, None, False)
        if buffers:
            for attr, b in module._buffers.items():
                if b is not None and attr not in module._non_persistent_buffers_set:
                    yield Slot(join(path, attr), path, module, attr, b, None, True)


def slot_map(model: nn.Module, *, buffers: bool = False) -> dict[str, Slot]:
    return {s.name: s for s in iter_slots(model, buffers=buffers)}


def storage_key(t: torch.Tensor) -> tuple | None:
    """Key equal for two tensors that are the same view of the same memory."""
    if t.device.type == "meta":
        return None
    if hasattr(t, "to_local"):  # a DTensor (FSDP2): its shard's memory on this rank
        t = t.to_local()
    ptr = t.untyped_storage().data_ptr()
    if ptr == 0:
        return None
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def group_by_tensor(slots: list[Slot]) -> list[list[Slot]]:
    """Partition slots into groups that hold one tensor (same object or same memory view).

    Groups keep first-seen order, and so do the slots inside them.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> from adaptnet.sharing import group_by_tensor, iter_slots
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        >>> adaptnet.tie(net, "1.weight", "0.weight")
        >>> [[s.name for s in g] for g in group_by_tensor(list(iter_slots(net)))]
        [['0.weight', '1.weight']]
    """
    groups: list[list[Slot]] = []
    by_id: dict[int, list[Slot]] = {}
    by_storage: dict[tuple, list[Slot]] = {}
    for s in slots:
        group = by_id.get(id(s.tensor))
        if group is None:
            key = storage_key(s.tensor)
            group = by_storage.get(key) if key is not None else None
            if group is None:
                group = []
                groups.append(group)
                if key is not None:
                    by_storage[key] = group
            by_id[id(s.tensor)] = group
        group.append(s)
    return groups


def relative_transform(slot: Slot, owner: Slot) -> str | None:
    """Transform that maps the owner slot's view to this slot's view."""
    return compose(slot.transform, owner.transform)








def as_names(value: object, caller: str, error: type[Exception]) -> list[str]:
    """``value`` (a name or a sequence of names) as a list of strings, or ``error``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise error(f"{caller}: expected a name or a list of names (str), got "
                f"{type(value).__name__}.")




def check_patterns(patterns: list[str], names: list[str], caller: str) -> None:
    """Raise SelectionError naming every pattern that matches none of ``names``."""
    bad = [p for p in patterns if not isinstance(p, str) or not any(matches(n, p) for n in names)]
    if bad:
        raise SelectionError(
            f"{caller}: pattern(s) {', '.join(repr(p) for p in bad)} match no parameter. "
            + suggest(str(bad[0]), _with_prefixes(names), "parameters")
            + " Patterns are globs on dotted names ('encoder.*', '*.bias'); a module path "
            "selects everything under it."
        )


def _with_prefixes(names: list[str]) -> list[str]:
    """Names and every module path above them, in first-seen order."""
    out: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]))
        out.setdefault(n)
    return list(out)
