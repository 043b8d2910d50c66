"""Declaring ties, checking them, and restoring them after PyTorch breaks them."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

from torch import nn

from adaptnet._tree import get_module, join, set_module, suggest, walk
from adaptnet.errors import TieBrokenError, TieError
from adaptnet.sharing._registry import (
    Tie,
    TieRegistry,
    ensure_registry,
    install_transposed,
    normalize_transform,
    registry,
    remove_transposed,
)
from adaptnet.sharing._slots import (
    Slot,
    as_names,
    group_by_tensor,
    iter_slots,
    ours,
    slot_map,
)

__all__ = ["assert_tied", "retie", "tie", "untie"]

RETIE_HINT = (
    "Call adaptnet.retie(model) after load_state_dict(assign=True), to_empty(), or any "
    "operation that replaces Parameter objects."
)


# --------------------------------------------------------------------------- declaring


def tie(model: nn.Module, member: str, owner: str, transform: str | None = None) -> None:
    """Make parameter ``member`` the same tensor as parameter ``owner``.

    After the call one tensor trains through both uses. With
    ``transform="transpose"`` the member *sees* ``owner.mT`` (an autoencoder's
    decoder tied to its encoder); it is computed on access through
    ``torch.nn.utils.parametrize``, so no copy exists and gradients from both
    uses reach the owner. The tie is recorded on ``model`` and restored by
    :func:`retie`, :func:`adaptnet.load` and friends.

    Tie before creating the optimizer: the member's old tensor is dropped.

    Args:
        model: the module both paths are relative to; the tie is recorded on it.
        member: dotted path of the parameter that gives up its own tensor.
        owner: dotted path of the parameter whose tensor is kept.
        transform: ``None``/``"identity"`` or ``"transpose"`` (2-D owners only).

    Raises:
        TieError: unknown path, same path twice, shape/dtype/device mismatch,
            unknown transform, or a tie that contradicts existing ones.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> lm = nn.ModuleDict({"embed": nn.Embedding(100, 16), "head": nn.Linear(16, 100)})
        >>> adaptnet.tie(lm, "head.weight", "embed.weight")
        >>> lm["head"].weight is lm["embed"].weight
        True
    """
    for what, path in (("member", member), ("owner", owner)):
        if not isinstance(path, str):
            raise TieError(f"tie(): {what} must be a dotted parameter path (str), got "
                           f"{type(path).__name__}.")
    try:
        transform = normalize_transform(transform)
    except ValueError as e:
        raise TieError(f"tie({member!r}, {owner!r}): {e}.") from None
    slots = slot_map(model)
    names = list(slots)
    for role, path in (("member", member), ("owner", owner)):
        if path not in slots:
            raise TieError(
                f"tie(): {role} {path!r} is not a parameter of {type(model).__name__}. "
                + suggest(path, names, "parameters")
            )
    if member == owner:
        raise TieError(f"tie(): member and owner are the same parameter {member!r}; "
                       "name two different parameters.")
    m, o = slots[member], slots[owner]
    if transform == "transpose" and (len(o.shape) != 2 or len(m.shape) != 2):
        raise TieError(
            f"tie({member!r}, {owner!r}, transform='transpose'): shapes {list(m.shape)} and "
            f"{list(o.shape)}; a transposed tie needs 2-D parameters."
        )
    expected = o.shape[::-1] if transform == "transpose" else o.shape
    if m.shape != expected:
        how = "the owner's transpose has" if transform else "the owner has"
        hint = (" Did you mean transform='transpose'?"
                if transform is None and len(o.shape) == 2 and m.shape == o.shape[::-1] else "")
        raise TieError(
            f"tie(): cannot tie {member!r} of shape {list(m.shape)} to {owner!r}: "
            f"{how} shape {list(expected)}.{hint}"
        )
    if m.tensor.dtype != o.tensor.dtype or m.tensor.device != o.tensor.device:
        raise TieError(
            f"tie(): {member!r} is {m.tensor.dtype} on {m.tensor.device} but {owner!r} is "
            f"{o.tensor.dtype} on {o.tensor.device}; move both to one dtype and device first "
            "(e.g. model.to(dtype)) and tie again."
        )
    reg = ensure_registry(model)
    try:
        reg.add_tie(member, owner, transform)  # resolves an owner that is itself a member
    except ValueError as e:
        raise TieError(f"tie({member!r}, {owner!r}): {e}.") from None
    retie(model)

def untie(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """Give parameters (or shared submodules) their own copy, ending their ties.

    For each name: a parameter gets its own tensor with its current value; a
    shared submodule path gets its own deep copy. Other members of the old
    group stay tied to each other. Untie before creating the optimizer.

    Returns:
        The names that were untied (those that shared nothing are skipped).

    Raises:
        TieError: unknown name, or a parameter inside a shared module (untie
            the module instead).

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        >>> adaptnet.tie(net, "1.weight", "0.weight")
        >>> adaptnet.untie(net, "1.weight")
        ['1.weight']
        >>> net[1].weight is net[0].weight
        False
    """
    names = as_names(names, "untie()", TieError)
    done = []
    for name in names:
        if _untie_one(model, name):
            done.append(name)
    retie(model)
    return done


# --------------------------------------------------------------------------- restoring


def retie(model: nn.Module) -> list[str]:
    """Re-establish every declared tie; idempotent and cheap when nothing is broken.

    PyTorch operations that replace ``Parameter`` objects break ties made by
    identity. After each of these, call ``retie`` (adaptnet's own loaders and
    materialisers do it for you):

    - ``model.load_state_dict(sd, assign=True)``
    - ``model.to_empty(device=...)`` (e.g. after building on the ``meta`` device)
    - ``model.to(...)``/``.cuda()``/``.half()`` with
      ``torch.__future__.set_overwrite_module_params_on_conversion(True)``
    - replacing a parameter by assignment (``mod.weight = nn.Parameter(...)``)

    Unaffected (ties survive): optimizer steps, ``deepcopy``, pickling,
    ``.to()`` by default, ``load_state_dict`` without ``assign``.

    When the tied tensors hold different values, the owner's value is kept.

    Returns:
        The member paths that had to be repaired.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        >>> adaptnet.tie(net, "1.weight", "0.weight")
        >>> net[1].weight = nn.Parameter(torch.zeros(10, 4))  # a plain assignment breaks the tie
        >>> adaptnet.retie(net)
        ['1.weight']
        >>> net[1].weight is net[0].weight
        True
    """
    repaired = []
    for prefix, holder, reg in registries(model):
        for s in reg.modules.values():
            own = get_module(holder, s.owner)
            if get_module(holder, s.member) is not own:
                set_module(holder, s.member, own)
                repaired.append(join(prefix, s.member))
        for t in reg.params.values():
            if _apply(holder, t):
                repaired.append(join(prefix, t.member))
    return repaired


def assert_tied(model: nn.Module) -> None:
    """Raise :class:`TieBrokenError` listing every declared tie that does not hold.

    Only identity checks: cheap enough to call every step.

    Example:
        >>> import torch.nn as nn, adaptnet
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        >>> adaptnet.tie(net, "1.weight", "0.weight")
        >>> adaptnet.assert_tied(net)  # silent while the tie holds
    """
    broken = []
    for prefix, holder, reg in registries(model):
        for s in reg.modules.values():
            if get_module(holder, s.member) is not get_module(holder, s.owner):
                broken.append(f"module {join(prefix, s.member)!r} is not "
                              f"{join(prefix, s.owner)!r}")
        for t in reg.params.values():
            if not _holds(holder, t):
                how = "the transpose of " if t.transform else ""
                broken.append(f"{join(prefix, t.member)!r} is not {how}{join(prefix, t.owner)!r}")
    if broken:
        raise TieBrokenError(
            f"{len(broken)} declared tie(s) no longer hold:\n  - " + "\n  - ".join(broken)
            + "\n" + RETIE_HINT
        )

# --------------------------------------------------------------------------- internals


def registries(model: nn.Module) -> Iterator[tuple[str, nn.Module, TieRegistry]]:
    seen = set()
    for prefix, module in walk(model):
        reg = registry(module)
        if reg is not None and id(reg) not in seen:
            seen.add(id(reg))
            yield prefix, module, reg

def _param(module: nn.Module, attr: str, path: str) -> nn.Parameter:
    p = module._parameters.get(attr)
    if p is None:
        raise TieBrokenError(f"declared tie owner {path!r} is not a parameter any more. "
                             + RETIE_HINT)
    return p


def _split(holder: nn.Module, path: str) -> tuple[nn.Module, str]:
    mod_path, _, attr = path.rpartition(".")
    return get_module(holder, mod_path), attr


def _holds(holder: nn.Module, t: Tie) -> bool:
    owner = _param(*_split(holder, t.owner), t.owner)
    module, attr = _split(holder, t.member)
    if t.transform is None:
        return module._parameters.get(attr) is owner
    return ours(module, attr) and module.parametrizations[attr].original is owner


def _apply(holder: nn.Module, t: Tie) -> bool:
    """Make tie ``t`` hold; return whether anything changed."""
    if _holds(holder, t):
        return False
    owner = _param(*_split(holder, t.owner), t.owner)
    module, attr = _split(holder, t.member)
    if t.transform is None:
        if ours(module, attr):
            remove_transposed(module, attr, getattr(module, attr))
        setattr(module, attr, owner)
    elif ours(module, attr):
        module.parametrizations[attr].original = owner
    else:
        install_transposed(module, attr, owner)
    return True


def _untie_one(model: nn.Module, name: str) -> bool:
    slots = slot_map(model)
    if name not in slots:
        modules = dict(walk(model))
        if name in modules:
            return _unshare(model, name)
        raise TieError(f"untie(): {name!r} is neither a parameter nor a submodule. "
                       + suggest(name, list(slots), "parameters"))
    for prefix, _holder, reg in registries(model):
        for s in reg.modules.values():
            inside = join(prefix, s.member), join(prefix, s.owner)
            if any(name.startswith(p + ".") for p in inside):
                raise TieError(
                    f"untie(): {name!r} lies inside shared module {inside[0]!r} "
                    f"(= {inside[1]!r}); untie the module instead: "
                    f"adaptnet.untie(model, {inside[0]!r})."
                )
    slot = slots[name]
    group = next(g for g in group_by_tensor(list(iter_slots(model)))
                 if any(s.name == name for s in g))
    if len(group) == 1:
        return False
    reused = [p for p, m in walk(model) if m is slot.module and p != slot.module_path]
    if reused and slot.transform is None:
        raise TieError(
            f"untie(): {name!r} belongs to module {slot.module_path!r}, which is the same "
            f"module object as {reused[0]!r} (the module is reused, not its parameter tied); "
            f"a parameter of it cannot get its own copy alone. Untie the module: "
            f"adaptnet.untie(model, {slot.module_path!r}) gives {slot.module_path!r} its own "
            "copy of every parameter.")
    _detach(slot)
    for prefix, holder, reg in registries(model):
        if prefix and not name.startswith(prefix + "."):
            continue
        new_root = reg.remove(name[len(prefix) + 1:] if prefix else name)
        if new_root is not None and new_root.transform is not None:
            _detach(slot_map(holder)[new_root.member])  # a new owner must be a plain tensor
    return True


def _detach(slot: Slot) -> None:
    """Give ``slot`` its own parameter holding its current value."""
    value = getattr(slot.module, slot.attr).detach().clone()
    if slot.transform is not None:
        remove_transposed(slot.module, slot.attr, value)
    else:
        setattr(slot.module, slot.attr,
                nn.Parameter(value, requires_grad=slot.tensor.requires_grad))


def _unshare(model: nn.Module, path: str) -> bool:
    for prefix, _holder, reg in registries(model):
        local = path[len(prefix) + 1:] if prefix else path
        if local in reg.modules or any(s.owner == local for s in reg.modules.values()):
            reg.remove_share(local)
    module = get_module(model, path)
    if sum(m is module for _, m in walk(model)) < 2:
        return False
    set_module(model, path, copy.deepcopy(module))
    return True
