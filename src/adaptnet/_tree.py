"""The module tree: walking it, naming and replacing submodules, matching dotted names.

Ground floor: every layer that looks into a user's ``nn.Module`` uses these.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator

from torch import nn
from torch.nn.utils import parametrize

from adaptnet.errors import ModelError

__all__ = ["STRATEGIES", "get_module", "join", "layer_order", "matches", "order_problem",
           "set_module", "suggest", "walk"]

STRATEGIES = ("all", "cycle", "sequence", "cycle_rev")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every (path, module), shared modules once per path; hides parametrization internals.

    Raises:
        ModelError: ``model`` is not an ``nn.Module``.
    """
    if not prefix and not isinstance(model, nn.Module):
        raise ModelError(f"expected the model, an nn.Module, got {type(model).__name__}.")
    yield prefix, model
    for name, child in model._modules.items():
        if child is None:
            continue
        if name == "parametrizations" and parametrize.is_parametrized(model):
            continue  # reported by ``iter_slots`` on the owning module
        yield from walk(child, join(prefix, name))


def suggest(name: str, candidates: list[str], what: str) -> str:
    """A 'did you mean' sentence listing the closest candidate names."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return f"Did you mean {', '.join(repr(c) for c in close)}?"
    shown = ", ".join(repr(c) for c in candidates[:8])
    more = f" (and {len(candidates) - 8} more)" if len(candidates) > 8 else ""
    return f"The model's {what} are: {shown}{more}." if candidates else f"The model has no {what}."


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(model, parent_path), name, module)


def matches(name: str, pattern: str) -> bool:
    """Glob match on a dotted path; a module path also matches everything under it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def order_problem(layers: int, blocks: int, strategy: str) -> str | None:
    """Why ``layers`` places cannot take ``blocks`` blocks by ``strategy``, or None."""
    if strategy not in STRATEGIES:
        return f"unknown strategy {strategy!r}; expected one of {STRATEGIES}"
    if isinstance(blocks, bool) or not isinstance(blocks, int) or \
            not 1 <= blocks <= max(layers, 1):
        return f"blocks={blocks!r} must be an integer from 1 to the number of layers ({layers})"
    if strategy == "all" and blocks != 1:
        return (f"strategy 'all' uses one block, got blocks={blocks}; use strategy='cycle' or "
                "'sequence' for several blocks")
    return None


def layer_order(layers: int, blocks: int, strategy: str) -> list[int]:
    """Which of ``blocks`` blocks each of ``layers`` places runs (Takase & Kiyono 2021); for
    6 places and 3 blocks: ``"sequence"`` 0 0 1 1 2 2, ``"cycle"`` 0 1 2 0 1 2,
    ``"cycle_rev"`` 0 1 2 2 1 0; ``"all"`` (one block) 0 0 0 0 0 0. Check the arguments
    with :func:`order_problem` first."""
    if strategy in ("all", "sequence"):
        return [i * blocks // layers for i in range(layers)]
    if strategy == "cycle":
        return [i % blocks for i in range(layers)]
    # cycle_rev: cycle through all but the last `blocks` places, then the blocks in reverse.
    return [i % blocks if i < layers - blocks else (blocks - 1) - (i - (layers - blocks))
            for i in range(layers)]
