"""Tie-aware freezing: a tied tensor is one tensor, so say who else it freezes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from adaptnet._tree import matches, walk
from adaptnet.errors import SelectionError
from adaptnet.sharing._slots import (
    as_names,
    check_patterns,
    group_by_tensor,
    iter_slots,
    relative_transform,
)
from adaptnet.sharing._tie import tie, untie

__all__ = ["FreezeReport", "freeze", "unfreeze"]


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`freeze`/:func:`unfreeze` changed.

    Attributes:
        requires_grad: the value set.
        changed: parameter paths matched by the patterns.
        collateral: paths *not* matched whose tensor changed too, through a tie.
        untied: paths that got their own copy instead (``untie=True``).
    """

    requires_grad: bool
    changed: tuple[str, ...]
    collateral: tuple[str, ...]
    untied: tuple[str, ...]

    def __str__(self) -> str:
        verb = "unfroze" if self.requires_grad else "froze"
        out = [f"{verb} {len(self.changed)} parameter(s)"]
        if self.collateral:
            out.append(f"also {verb} through ties: {', '.join(self.collateral)}")
        if self.untied:
            out.append(f"untied first: {', '.join(self.untied)}")
        return "; ".join(out)


def freeze(model: nn.Module, patterns: str | Sequence[str], *, untie: bool = False
           ) -> FreezeReport:
    """Set ``requires_grad=False`` on parameters matching ``patterns``.

    Patterns are globs on dotted parameter paths (``"encoder.*"``,
    ``"*.bias"``); a module path selects everything under it. A tied tensor
    is one tensor: freezing ``head.weight`` freezes ``embed.weight`` if they
    are tied. That *collateral* change is reported; with ``untie=True`` the
    matched paths get their own copy first, so only they are frozen.

    Raises:
        SelectionError: a pattern matches no parameter.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> lm = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10)})
        >>> adaptnet.tie(lm, "head.weight", "embed.weight")
        >>> adaptnet.freeze(lm, "head").collateral
        ('embed.weight',)
    """
    return _set(model, patterns, False, untie, "freeze()")


def unfreeze(model: nn.Module, patterns: str | Sequence[str], *, untie: bool = False
             ) -> FreezeReport:
    """Set ``requires_grad=True`` on parameters matching ``patterns``; see :func:`freeze`.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = adaptnet.freeze(net, "*")
        >>> _ = adaptnet.unfreeze(net, "1.*")
        >>> [p.requires_grad for p in net.parameters()]
        [False, False, True, True]
    """
    return _set(model, patterns, True, untie, "unfreeze()")


def _reused_modules_matched(model: nn.Module, slots: list, hit) -> list[str]:
    """Paths of a reused module (one object at several paths) whose parameters all match,
    where the module's other paths do not all match."""
    paths: dict[int, list[str]] = {}
    for path, module in walk(model):
        paths.setdefault(id(module), []).append(path)

    def all_hit(path: str) -> bool:
        under = [s for s in slots if s.module_path == path
                 or s.module_path.startswith(path + ".")]
        return bool(under) and all(hit(s.name) for s in under)

    out: list[str] = []
    for group in paths.values():
        if len(group) > 1 and not all(all_hit(p) for p in group):
            out += [p for p in group if all_hit(p)
                    and not any(p.startswith(q + ".") for q in out)]
    return out


def _set(model: nn.Module, patterns: str | Sequence[str], value: bool, do_untie: bool,
         caller: str) -> FreezeReport:
    patterns = as_names(patterns, caller, SelectionError)
    slots = list(iter_slots(model))
    check_patterns(patterns, [s.name for s in slots], caller)

    def hit(name: str) -> bool:
        return any(matches(name, p) for p in patterns)

    untied: list[str] = []
    if do_untie:
        for path in _reused_modules_matched(model, slots, hit):
            untie(model, path)  # module reuse: the matched path gets its own module
            untied += [s.name for s in slots if s.module_path == path
                       or s.module_path.startswith(path + ".")]
        slots = list(iter_slots(model))
        for group in group_by_tensor(slots):
            matched = [s for s in group if hit(s.name)]
            if matched and len(matched) < len(group) and group[0].tensor.requires_grad != value:
                # The matched paths leave the group and stay tied among themselves.
                untie(model, matched[0].name)
                for s in matched[1:]:
                    untie(model, s.name)
                    tie(model, s.name, matched[0].name, relative_transform(s, matched[0]))
                untied += [s.name for s in matched]
        slots = list(iter_slots(model))

    changed, collateral = [], []
    for group in group_by_tensor(slots):
        matched = [s.name for s in group if hit(s.name)]
        if not matched:
            continue
        changed += matched
        if any(s.tensor.requires_grad != value for s in group):
            collateral += [s.name for s in group if s.name not in matched]
            for s in group:  # distinct objects over one memory each get the flag
                s.tensor.requires_grad_(value)
    return FreezeReport(value, tuple(changed), tuple(collateral), tuple(untied))
