"""Optimizer parameter groups built on unique tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from adaptnet._tree import matches
from adaptnet.errors import ConfigError, SelectionError
from adaptnet.sharing._slots import check_patterns, group_by_tensor, iter_slots

__all__ = ["param_groups"]

NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] | None = None,
    rules: Mapping[str, Mapping[str, Any]] | None = None,
    frozen: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups in which every trainable tensor appears once.

    Building groups from ``named_parameters()`` by hand lists a tied tensor
    under each name, and ``torch.optim`` then raises "some parameters appear in
    more than one parameter group". Here each distinct tensor is placed once,
    under its first path; frozen tensors are left out unless ``frozen=True``.

    Precedence, for a tensor known by several paths (a tie):

    1. ``rules`` in order: the first pattern matching *any* of its paths gives
       its options (e.g. ``{"backbone.*": {"lr": 1e-4}}``);
    2. unless that rule sets ``weight_decay``: 0 if *any* of its paths matches
       ``no_decay``, else ``weight_decay``.

    Args:
        weight_decay: decay for tensors not excluded.
        no_decay: glob patterns excluded from decay. Default: every ``bias``
            and every parameter of a normalisation layer (BatchNorm, LayerNorm,
            GroupNorm, RMSNorm, ...).
        rules: ordered ``pattern -> optimizer options``.
        frozen: include frozen tensors too, for a schedule that unfreezes them
            during training (optimizers skip a tensor while its gradient is None).

    Returns:
        ``[{"params": [...], "param_names": [...], "weight_decay": ..., **options}, ...]``,
        ready for any ``torch.optim`` optimizer.

    Raises:
        SelectionError: a pattern in ``rules`` or ``no_decay`` matches no parameter.
        ConfigError: ``weight_decay`` negative or not finite.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> groups = adaptnet.param_groups(net, weight_decay=0.1)
        >>> [(g["param_names"], g["weight_decay"]) for g in groups]
        [(['0.weight'], 0.1), (['0.bias', '1.weight', '1.bias'], 0.0)]
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or \
            not 0 <= weight_decay < math.inf:
        raise ConfigError(f"param_groups(): weight_decay must be a finite number >= 0, got "
                          f"{weight_decay!r}.")
    slots = list(iter_slots(model))
    names = [s.name for s in slots]
    rules = dict(rules or {})
    for pattern, options in rules.items():
        if not isinstance(options, Mapping) or "params" in options:
            raise SelectionError(
                f"param_groups(): rules[{pattern!r}] must be a mapping of optimizer options "
                f"such as {{'lr': 1e-4}}, got {options!r}."
            )
    check_patterns(list(rules), names, "param_groups(rules=...)")
    if no_decay is not None:
        no_decay = [no_decay] if isinstance(no_decay, str) else list(no_decay)
        check_patterns(no_decay, names, "param_groups(no_decay=...)")

    def excluded(slot) -> bool:
        if no_decay is not None:
            return any(matches(slot.name, p) for p in no_decay)
        return slot.attr == "bias" or isinstance(slot.module, NORM_TYPES)

    groups: dict[str, dict[str, Any]] = {}
    for group in group_by_tensor(slots):
        tensor = group[0].tensor
        if not (tensor.requires_grad or frozen):
            continue
        options = next((dict(o) for p, o in rules.items()
                        if any(matches(s.name, p) for s in group)), {})
        if "weight_decay" not in options:
            options["weight_decay"] = 0.0 if any(excluded(s) for s in group) else weight_decay
        key = repr(sorted(options.items()))  # option values may be unhashable
        entry = groups.setdefault(key, {"params": [], "param_names": [], **options})
        entry["params"].append(tensor)
        entry["param_names"].append(group[0].name)
    return list(groups.values())
