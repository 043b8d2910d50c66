"""The tie registry: ties as plain, picklable data kept on the model.

The registry records *what should be one tensor*; PyTorch's ``Parameter``
identity is *how* it is one tensor. When something replaces a ``Parameter``
object (``load_state_dict(assign=True)``, ``to_empty()``), the registry is how
:func:`adaptnet.retie` puts identity back.

It lives in the ``__dict__`` of the module :func:`adaptnet.tie` was called on,
under :data:`ATTR`, with paths relative to that module. It therefore follows
the module through ``deepcopy``, pickling and ``.to()``, and never appears in
``state_dict()``.

A member's transform says how it sees its owner: ``None`` (the same tensor)
or ``"transpose"`` (the owner's transpose, for a decoder tied to an encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

ATTR = "_adaptnet_ties"
_ALIASES = {None: None, "identity": None, "transpose": "transpose", "T": "transpose"}


def normalize_transform(transform: str | None) -> str | None:
    """Map accepted spellings to None or "transpose"; raise ValueError otherwise."""
    if transform not in _ALIASES:
        raise ValueError(
            f"unknown tie transform {transform!r}; expected None, 'identity' or 'transpose'"
        )
    return _ALIASES[transform]


def compose(outer: str | None, inner: str | None) -> str | None:
    """outer ∘ inner. Transforms form a group of two: transposing twice is identity."""
    return None if outer == inner else "transpose"


def apply_transform(transform: str | None, t: torch.Tensor) -> torch.Tensor:
    return t.mT if transform == "transpose" else t


@dataclass(frozen=True)
class Tie:
    """``member`` is ``transform(owner)``; both are dotted parameter paths."""

    member: str
    owner: str
    transform: str | None = None


@dataclass(frozen=True)
class ModuleShare:
    """Submodule ``member`` is the same object as submodule ``owner``."""

    member: str
    owner: str


@dataclass
class TieRegistry:
    """Declared ties of one module, keyed by member path; owners are always roots."""

    params: dict[str, Tie] = field(default_factory=dict)
    modules: dict[str, ModuleShare] = field(default_factory=dict)

    def add_tie(self, member: str, owner: str, transform: str | None) -> bool:
        """Declare ``member = transform(owner)``, keeping owners as roots.

        Returns False when the tie is already implied by existing ones. Raises
        ValueError when it contradicts them (a tensor cannot equal its own transpose).
        """
        if owner in self.params:  # owner is itself a member: tie to its root
            root = self.params[owner]
            owner, transform = root.owner, compose(transform, root.transform)
        if owner == member:
            if transform is None:
                return False
            raise ValueError(f"{member!r} is already tied to itself without a transpose")
        for m, t in list(self.params.items()):  # members of `member` follow it to the new root
            if t.owner == member:
                self.params[m] = Tie(m, owner, compose(t.transform, transform))
        self.params[member] = Tie(member, owner, transform)
        return True

    def add_share(self, member: str, owner: str) -> None:
        owner = self.modules[owner].owner if owner in self.modules else owner
        for m, s in list(self.modules.items()):
            if s.owner == member:
                self.modules[m] = ModuleShare(m, owner)
        self.modules[member] = ModuleShare(member, owner)

    def remove(self, name: str) -> Tie | None:
        """Forget every tie that makes ``name`` one tensor with another.

        If ``name`` was an owner, its first member becomes the owner of the
        rest; that new owner's Tie (relative to the old owner) is returned so the
        caller can give it a plain tensor if it was a transposed view.
        """
        self.params.pop(name, None)
        members = [t for t in self.params.values() if t.owner == name]
        if not members:
            return None
        members.sort(key=lambda t: t.transform is not None)  # prefer a plain member
        new_root = members[0]
        del self.params[new_root.member]
        for t in members[1:]:
            # t = T_t(old), new_root = T_r(old)  =>  t = T_t(T_r(new_root))
            self.params[t.member] = Tie(t.member, new_root.member,
                                        compose(t.transform, new_root.transform))
        return new_root

    def remove_share(self, path: str) -> None:
        self.modules.pop(path, None)
        members = [s for s in self.modules.values() if s.owner == path]
        if members:
            new_root = members[0].member
            del self.modules[new_root]
            for s in members[1:]:
                self.modules[s.member] = ModuleShare(s.member, new_root)


def registry(module: nn.Module) -> TieRegistry | None:
    """The ties declared on ``module`` itself, if any."""
    return module.__dict__.get(ATTR)


def ensure_registry(module: nn.Module) -> TieRegistry:
    """The ties declared on ``module``, created empty when missing."""
    return module.__dict__.setdefault(ATTR, TieRegistry())


class Transposed(nn.Module):
    """Parametrization for the member of a transposed tie: ``member = owner.mT``.

    The parametrization's ``original`` *is* the owner's ``Parameter``, so one
    tensor trains through both uses, with no copy.
    """

    def forward(self, owner: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return owner.mT
        # Without grad mode, a view of the parameter would claim requires_grad with no
        # grad_fn, which torch's ModuleTracker (FlopCounterMode, count_macs) rejects.
        return owner.detach().mT

    def right_inverse(self, member: torch.Tensor) -> torch.Tensor:
        return member.mT


def install_transposed(module: nn.Module, attr: str, owner: nn.Parameter) -> None:
    """Make ``module.attr`` the transpose of ``owner`` (module.attr must exist)."""
    parametrize.register_parametrization(module, attr, Transposed())
    module.parametrizations[attr].original = owner
    _make_picklable(module)


def remove_transposed(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Turn the transposed member ``module.attr`` into a plain parameter holding ``value``.

    ``remove_parametrizations(leave_parametrized=True)`` would ``set_`` the
    original, i.e. overwrite the owner's tensor; so the owner is swapped out first.
    """
    plist = module.parametrizations[attr]
    requires_grad = plist.original.requires_grad
    plist.original = nn.Parameter(value.mT.detach().clone(), requires_grad=requires_grad)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def _make_picklable(module: nn.Module) -> None:
    # PyTorch refuses to pickle parametrized modules (their class is made at
    # run time). Give that class a reducer that rebuilds it from public API.
    cls = type(module)
    if "__reduce_ex__" not in cls.__dict__:
        cls.__reduce_ex__ = _reduce_parametrized


def _reduce_parametrized(self: nn.Module, protocol: int):
    base = type(self).__bases__[0]
    state = dict(self.__dict__)
    modules = dict(state["_modules"])
    plists = modules.pop("parametrizations")
    state["_modules"] = modules
    return _rebuild_parametrized, (base, state, dict(plists.items()))


def _rebuild_parametrized(base: type, state: dict, plists: dict) -> nn.Module:
    module = base.__new__(base)
    module.__setstate__(state)
    for attr, plist in plists.items():
        original = plist.original
        with torch.no_grad():
            value = plist()  # the parametrized value, to register on
        module.register_parameter(attr, nn.Parameter(value.clone(), original.requires_grad))
        for p in plist:
            parametrize.register_parametrization(module, attr, p, unsafe=plist.unsafe)
        module.parametrizations[attr].original = original
    _make_picklable(module)
    return module
