"""Declarative initialisation rules, applied once per unique tensor."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.table import Table
from torch import nn

from adaptnet._table import render, table
from adaptnet._tree import matches, suggest, walk
from adaptnet.errors import InitError, SelectionError
from adaptnet.init._schemes import Scheme, parse_scheme
from adaptnet.sharing import Slot, group_by_tensor, iter_slots

__all__ = ["InitReport", "InitRow", "init_report", "initialize"]

_RECORD = "_adaptnet_init"  # model attribute: path -> the scheme that initialised it

Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class InitRow:
    """One unique tensor: its paths, the scheme applied, and what its values look like."""

    paths: tuple[str, ...]
    shape: tuple[int, ...]
    scheme: str | None  # None: no rule matched; the tensor kept its value
    mean: float
    std: float
    expected_std: float | None


@dataclass(frozen=True)
class InitReport:
    """What :func:`initialize` did (or :func:`init_report` sees), one row per unique tensor."""

    rows: tuple[InitRow, ...]

    def __rich__(self) -> Table:
        rows = [(r.paths[0] + (f" (+{len(r.paths) - 1} tied)" if len(r.paths) > 1 else ""),
                 "×".join(map(str, r.shape)) or "scalar", r.scheme or "(kept)",
                 f"{r.mean:.4f}", f"{r.std:.4f}",
                 "-" if r.expected_std is None else f"{r.expected_std:.4f}") for r in self.rows]
        return table(None, ("tensor", "shape", "scheme", "mean", "std", "expected"), rows,
                     numbers=(3, 4, 5), words=(0, 1))

    def __str__(self) -> str:
        """The table as plain text at the terminal's width (``COLUMNS``)."""
        return render(self)


def initialize(model: nn.Module, rules: Rules, *, seed: int | None = None) -> InitReport:
    """Initialise ``model`` by rules, once per unique tensor.

    Each rule maps a *selector* to a scheme (see :func:`adaptnet.init.parse_scheme`).
    Selectors, tried in order; the first that matches a tensor's path decides:

    - ``"Linear.weight"``, ``"Conv2d.*"``, ``"LayerNorm"``: a module class name
      (of a module in the model), then a glob on the parameter's name;
    - ``"bias"``, ``"weight*"``: a glob on the parameter's name, in any module;
    - ``"embed.weight"``, ``"encoder.*"``: a glob on the dotted path (a module
      path selects everything under it).

    A tied tensor is initialised once, even when several of its paths match;
    if its paths match rules with different schemes, nothing is initialised
    and an ``InitError`` names the paths and the rules. For a transposed tie
    the scheme sees the stored (owner's) tensor, so fan-in and fan-out are the
    owner's: for ``tie(ae, "dec.weight", "enc.weight", "transpose")`` Kaiming's
    fan-in is the encoder's input size. Tensors no rule matches keep their
    values.

    Args:
        model: the model.
        rules: ``{selector: scheme}`` (ordered) or a list of pairs.
        seed: seeds a private generator, so the result does not depend on (and
            does not change) the global RNG; ``None`` uses the global RNG.

    Returns:
        The :class:`InitReport` of the model after initialisation.

    Raises:
        InitError: an unknown scheme or argument, a scheme the tensor's shape
            cannot take, or conflicting rules for a tied tensor.
        SelectionError: a selector that matches no parameter.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> rules = {"Linear.weight": "kaiming_uniform(nonlinearity=relu)", "bias": "zeros"}
        >>> report = adaptnet.initialize(net, rules, seed=0)
        >>> [r.scheme for r in report.rows][:2]
        ["kaiming_uniform(nonlinearity='relu')", 'zeros']
        >>> isinstance(report, adaptnet.init.InitReport), type(report.rows[0]).__name__
        (True, 'InitRow')
        >>> isinstance(report.rows[0], adaptnet.init.InitRow), "orthogonal" in adaptnet.init.SCHEMES
        (True, True)
    """
    if not isinstance(rules, Mapping | list | tuple) or (
            not isinstance(rules, Mapping) and not all(
                isinstance(r, list | tuple) and len(r) == 2 for r in rules)):
        raise InitError(f"initialize(): rules must be {{selector: scheme}} or a list of "
                        f"(selector, scheme) pairs, got {type(rules).__name__}; e.g. "
                        "{'Linear.weight': 'kaiming_uniform', 'bias': 'zeros'}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**63):
        raise InitError(f"initialize(): seed must be an int in [0, 2**63) or None, got "
                        f"{seed!r}.")
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    schemes = [parse_scheme(spec, f"rule {sel!r}: ") for sel, spec in pairs]
    slots = list(iter_slots(model))
    types = {type(m).__name__ for _, m in walk(model)}
    selectors = [str(sel) for sel, _ in pairs]
    tests = [_selector(sel, types) for sel in selectors]
    unused = [sel for sel, test in zip(selectors, tests, strict=True)
              if not any(test(s) for s in slots)]
    if unused:
        raise SelectionError(
            f"initialize(): selector(s) {', '.join(map(repr, unused))} match no parameter. "
            + suggest(unused[0], [s.name for s in slots] + sorted(types), "parameters")
            + " A selector is a module class and parameter ('Linear.weight'), a parameter "
            "name ('bias'), or a dotted path glob ('encoder.*').")
    plan: list[tuple[list[Slot], Scheme]] = []
    for group in group_by_tensor(slots):
        chosen = {}
        for s in group:
            k = next((k for k, test in enumerate(tests) if test(s)), None)
            if k is not None:
                chosen.setdefault(str(schemes[k]), (k, s))
        if len(chosen) > 1:
            (k1, s1), (k2, s2) = list(chosen.values())[:2]
            raise InitError(
                f"initialize(): {s1.name} and {s2.name} are one tied tensor, but rule "
                f"{selectors[k1]!r} gives it {schemes[k1]} and rule {selectors[k2]!r} gives "
                f"it {schemes[k2]}. A tied tensor is initialised once: make the rules agree, "
                f"e.g. put {{'{s2.name}': '{schemes[k1]}'}} before rule {selectors[k2]!r}.")
        if chosen:
            k, _ = next(iter(chosen.values()))
            schemes[k].check(group[0].tensor, group[0].name)
            plan.append((group, schemes[k]))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    record = getattr(model, _RECORD, {})
    for group, scheme in plan:
        _apply(scheme, group[0].tensor, generator)
        for s in group:
            record[s.name] = str(scheme)
    object.__setattr__(model, _RECORD, record)
    return init_report(model)


def init_report(model: nn.Module) -> InitReport:
    """Per unique tensor: the scheme :func:`initialize` applied, observed and expected std.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> report = adaptnet.init_report(net)
        >>> [row.paths for row in report.rows]
        [('0.weight',), ('0.bias',), ('2.weight',), ('2.bias',)]
    """
    record = getattr(model, _RECORD, {})
    rows = []
    for group in group_by_tensor(list(iter_slots(model))):
        t = group[0].tensor.detach()
        name = next((record[s.name] for s in group if s.name in record), None)
        scheme = parse_scheme(name) if name else None
        values = t.double()
        rows.append(InitRow(
            tuple(s.name for s in group), tuple(t.shape), name,
            float(values.mean()) if t.numel() else 0.0,
            float(values.std()) if t.numel() > 1 else 0.0,
            scheme.expected_std(t) if scheme else None))
    return InitReport(tuple(rows))


def _selector(selector: str, types: set[str]):
    head, dot, rest = selector.partition(".")
    if head in types:
        return lambda s: type(s.module).__name__ == head and \
            (not dot or fnmatch.fnmatchcase(s.attr, rest))
    if not dot:
        return lambda s: fnmatch.fnmatchcase(s.attr, selector)
    return lambda s: matches(s.name, selector)


def _apply(scheme: Scheme, t: torch.Tensor, generator: torch.Generator | None) -> None:
    if generator is None or t.device.type == "cpu":
        scheme.apply(t, generator)
        return
    scratch = torch.empty(t.shape, dtype=t.dtype)  # the seeded generator lives on the CPU
    scheme.apply(scratch, generator)
    with torch.no_grad():
        t.copy_(scratch)
