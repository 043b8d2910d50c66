"""Discovering ties: which parameter paths are one tensor, declared or not."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptnet._tree import get_module, join
from adaptnet.sharing._slots import (
    Slot,
    group_by_tensor,
    iter_slots,
    relative_transform,
)
from adaptnet.sharing._tie import registries

__all__ = ["TieGroup", "TieMember", "ties"]


@dataclass(frozen=True)
class TieMember:
    """One member of a :class:`TieGroup`.

    Attributes:
        name: dotted parameter path.
        transform: ``None`` or ``"transpose"``, how it sees the owner.
        declared: made by :func:`tie`/:func:`share` (else found by identity or
            memory, e.g. a tie by plain attribute assignment).
    """

    name: str
    transform: str | None
    declared: bool


@dataclass(frozen=True)
class TieGroup:
    """Parameter paths that are one tensor.

    Attributes:
        owner: the path that holds the tensor.
        members: the other paths.
        shape: the owner's shape.
        numel: elements in the one tensor.
        kind: ``"identity"`` (one ``Parameter`` object) or ``"storage"``
            (distinct ``Parameter`` objects over the same memory: an optimizer
            would update it once per object, which is rarely intended).
    """

    owner: str
    members: tuple[TieMember, ...]
    shape: tuple[int, ...]
    numel: int
    kind: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.owner, *(m.name for m in self.members))


def ties(model: nn.Module) -> list[TieGroup]:
    """Every group of parameter paths that are one tensor, declared or not.

    Found by object identity and by memory, so ties made by plain assignment
    (``head.weight = embed.weight``) appear too, with ``declared=False``.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> layer = nn.Linear(8, 8)
        >>> [g.names for g in adaptnet.ties(nn.Sequential(layer, nn.ReLU(), layer))]
        [('0.weight', '2.weight'), ('0.bias', '2.bias')]
    """
    declared_owner = declared_owners(model)
    groups = []
    for slots in group_by_tensor(list(iter_slots(model))):
        if len(slots) < 2:
            continue
        by_obj = {id(s.tensor) for s in slots}
        owner = pick_owner(slots, declared_owner)
        members = tuple(
            TieMember(s.name, relative_transform(s, owner), s.name in declared_owner)
            for s in slots if s is not owner
        )
        groups.append(TieGroup(owner.name, members, owner.shape, owner.tensor.numel(),
                               "identity" if len(by_obj) == 1 else "storage"))
    return groups

def declared_owners(model: nn.Module) -> dict[str, str]:
    """member path -> declared owner path, module shares expanded to their parameters."""
    out = {}
    for prefix, holder, reg in registries(model):
        for t in reg.params.values():
            out[join(prefix, t.member)] = join(prefix, t.owner)
        for s in reg.modules.values():
            for slot in iter_slots(get_module(holder, s.owner)):
                out[join(join(prefix, s.member), slot.name)] = join(join(prefix, s.owner),
                                                                    slot.name)
    return out


def pick_owner(slots: list[Slot], declared_owner: dict[str, str]) -> Slot:
    names = {s.name: s for s in slots}
    for s in slots:
        if declared_owner.get(s.name) in names:
            return names[declared_owner[s.name]]
    return next((s for s in slots if s.transform is None), slots[0])
