"""Cross-layer sharing: several submodules become one module."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from adaptnet._tree import get_module, join, layer_order, order_problem, suggest, walk
from adaptnet.errors import ShareError
from adaptnet.sharing._registry import ensure_registry
from adaptnet.sharing._slots import as_names, iter_slots
from adaptnet.sharing._tie import retie

__all__ = ["share"]


def share(
    model: nn.Module,
    modules: str | Sequence[str],
    owner: str | None = None,
    *,
    blocks: int = 1,
    strategy: str = "all",
) -> list[str]:
    """Make several submodules one module (cross-layer sharing).

    ``modules`` is a list of submodule paths, or the path of a container
    (``nn.ModuleList``/``nn.Sequential``) whose children are the layers. The
    layers become ``blocks`` distinct modules, assigned by ``strategy``
    (Takase & Kiyono 2021, "Lessons on Parameter Sharing across Layers in
    Transformers"); for 6 layers and 3 blocks:

    - ``"all"``: every layer is one block (``blocks`` must be 1; ALBERT).
    - ``"sequence"``: consecutive layers share: 0 0 1 1 2 2.
    - ``"cycle"``: blocks repeat in order: 0 1 2 0 1 2.
    - ``"cycle_rev"``: cycle, then the last round reversed: 0 1 2 2 1 0.

    Block ``j`` is the first layer assigned to it, or ``owner`` (with
    ``blocks=1``), which may be any submodule of the same structure. Share
    before creating the optimizer.

    Returns:
        For each layer, the path of the module it now is.

    Raises:
        ShareError: unknown path, fewer than two layers, a layer that contains
            another, different structures, or a bad ``blocks``/``strategy``.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
        >>> adaptnet.share(net, [str(i) for i in range(4)], blocks=2, strategy="cycle")
        ['0', '1', '0', '1']
        >>> net[2] is net[0]
        True
    """
    paths = _layer_paths(model, modules)
    n = len(paths)
    problem = order_problem(n, blocks, strategy)
    if problem:
        raise ShareError(f"share(): {problem}.")
    if owner is not None and blocks != 1:
        raise ShareError("share(): owner= names the one shared block; it needs blocks=1.")
    if owner is None and n < 2:
        raise ShareError(f"share(): got one layer {paths}; name at least two, or an owner.")
    if owner is not None:
        _layer_paths(model, [owner])
    assignment = layer_order(n, blocks, strategy)
    firsts = {b: paths[assignment.index(b)] for b in set(assignment)}
    owners = [owner if owner is not None else firsts[b] for b in assignment]

    problems = []
    for path, own in zip(paths, owners, strict=True):
        if path != own and (path.startswith(own + ".") or own.startswith(path + ".")):
            problems.append(f"{path!r} and {own!r}: one contains the other")
        elif path != own:
            problems += _structure_diff(get_module(model, path), get_module(model, own), path, own)
    if problems:
        raise ShareError("share(): these layers cannot be one module:\n  - "
                         + "\n  - ".join(problems)
                         + "\nShared layers must have the same type, parameters and buffers.")
    reg = ensure_registry(model)
    for path, own in zip(paths, owners, strict=True):
        if path != own:
            reg.add_share(path, own)
    retie(model)
    return owners

def _layer_paths(model: nn.Module, modules: str | Sequence[str]) -> list[str]:
    known = dict(walk(model))
    if isinstance(modules, str):
        if modules not in known:
            raise ShareError(f"share(): {modules!r} is not a submodule of "
                             f"{type(model).__name__}. " + suggest(modules, list(known)[1:],
                                                                    "submodules"))
        container = known[modules]
        return [join(modules, n) for n, c in container._modules.items() if c is not None]
    paths = as_names(modules, "share()", ShareError)
    unknown = [p for p in paths if p not in known]
    if unknown:
        raise ShareError("share(): not submodules of " + type(model).__name__ + ": "
                         + ", ".join(repr(p) for p in unknown) + ". "
                         + suggest(unknown[0], list(known)[1:], "submodules"))
    return paths


def _structure_diff(a: nn.Module, b: nn.Module, pa: str, pb: str) -> list[str]:
    if type(a) is not type(b):
        return [f"{pa!r} is {type(a).__name__} but {pb!r} is {type(b).__name__}"]

    def signature(m: nn.Module) -> dict[str, tuple]:
        return {s.name: (s.shape, s.tensor.dtype) for s in iter_slots(m, buffers=True)}

    sa, sb = signature(a), signature(b)
    out = []
    for name in sorted(set(sa) | set(sb)):
        if sa.get(name) != sb.get(name):
            ga = "missing" if name not in sa else f"{list(sa[name][0])} {sa[name][1]}"
            gb = "missing" if name not in sb else f"{list(sb[name][0])} {sb[name][1]}"
            out.append(f"{pa}.{name} is {ga} but {pb}.{name} is {gb}")
    return out
