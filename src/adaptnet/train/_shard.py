"""Tie-aware FSDP2: ``fully_shard`` units that never split a tie, and unused parameters that
still join every reduce-scatter.

Two things break plain ``fully_shard`` on the models adaptnet builds:

- A tensor reached from two units (an embedding tied to the head, a
  transposed tie, a block shared across layers) is refused ("shared with a
  parameter already managed by another FSDP group"). Here a unit is sharded
  on its own only if every tensor it holds is held inside it alone; a unit
  that shares a tensor with the outside is merged into its parent (in the
  end, the root), so every tie group lives in one unit and stays one tensor.
- A dynamic model leaves some parameters without a gradient on some ranks
  (no sample there took that branch). FSDP2 reduce-scatters only the
  parameters that have one, so the ranks disagree and the collective fails.
  Each unit's output is given a zero term, ``0 * sum(p)``, over the unit's
  own parameters: every parameter then has a gradient (zero where unused) on
  every rank, as DDP's ``find_unused_parameters`` arranges for DDP. A unit
  must therefore run on every step on every rank (the root always does;
  don't make a per-sample branch its own unit). A parameter whose module no
  rank called in the step, and whose gradient is zero on every rank, then
  has its gradient set back to None after the step's backward
  (:func:`forget_unused`; ``fit`` calls it), as DDP leaves it: Adam and
  weight decay skip it, exactly as in one process.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from adaptnet._io import shown
from adaptnet._tree import get_module
from adaptnet.errors import ConfigError
from adaptnet.sharing import assert_tied, group_by_tensor, iter_slots

__all__ = ["ShardPlan", "forget_unused", "is_sharded", "shard"]

_USAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Usage


@dataclass(frozen=True)
class ShardPlan:
    """What :func:`shard` did.

    Attributes:
        units: the module paths sharded as their own ``fully_shard`` unit,
            innermost first; ``""`` (the root, last) holds everything else.
        merged: requested units that share a tensor with the rest of the model
            (a tie, a shared block), so their tensors went to the parent unit.
    """

    units: tuple[str, ...]
    merged: tuple[str, ...] = field(default=())


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds sharded (FSDP2 ``DTensor``) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard(model: nn.Module, units: Sequence[str] = (), *, mesh: Any = None,
          reshard_after_forward: bool = True) -> ShardPlan:
    """Shard ``model`` with FSDP2 (``fully_shard``), keeping every tie one tensor.

    Args:
        units: module paths to shard as units of their own (e.g. each
            Transformer block); a unit that shares a tensor with modules
            outside it is merged into its parent instead (see
            :class:`ShardPlan`). The root is always a unit.
        mesh: a ``DeviceMesh`` (default: one dimension over every rank).
        reshard_after_forward: passed to ``fully_shard`` for the inner units.

    Returns:
        The plan that was applied.

    Raises:
        ConfigError: no process group (run under ``torchrun`` and call
            ``torch.distributed.init_process_group``, or let ``fit(...,
            strategy="fsdp")`` do it), an unknown unit path, or a model
            already sharded.

    After sharding the parameters are ``DTensor`` shards; build the optimizer
    afterwards. :func:`adaptnet.save` gathers a sharded model whole (call it on
    every rank; rank 0 writes) and :func:`adaptnet.load` loads into one.
    """
    from torch.distributed.fsdp import fully_shard

    if not isinstance(model, nn.Module):
        raise ConfigError(f"shard(): model must be an nn.Module, got {type(model).__name__}.")
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("shard(): FSDP2 needs a process group, and there is none. Run under "
                          "torchrun (torchrun --nproc_per_node=2 train.py) and call "
                          "torch.distributed.init_process_group(), or train with "
                          "adaptnet.fit(..., strategy='fsdp'), which does both.")
    if is_sharded(model):
        raise ConfigError("shard(): the model is sharded already.")
    if isinstance(units, str):
        units = [units]
    paths = dict(model.named_modules(remove_duplicate=False))
    unknown = [u for u in units if not isinstance(u, str) or u not in paths or not u]
    if unknown:
        raise ConfigError(f"shard(): unit(s) {', '.join(map(shown, unknown))} are not "
                          f"submodules of {type(model).__name__}; units are module paths "
                          f"such as {', '.join(repr(p) for p in list(paths)[1:4])}.")
    groups = group_by_tensor(list(iter_slots(model)))
    kept, merged = [], []
    for unit in sorted(dict.fromkeys(units), key=lambda u: -u.count(".")):  # innermost first
        def inside(path: str, unit: str = unit) -> bool:
            return path == unit or path.startswith(unit + ".")
        split = any(any(inside(s.module_path) for s in g) and
                    not all(inside(s.module_path) for s in g) for g in groups)
        (merged if split else kept).append(unit)
    for unit in kept:
        module = get_module(model, unit)
        _every_parameter_gets_a_gradient(module, [u for u in kept if u.startswith(unit + ".")],
                                         unit)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    _every_parameter_gets_a_gradient(model, kept, "")
    _USAGE[model] = _Usage(model)
    fully_shard(model, mesh=mesh)
    assert_tied(model)  # every tie survived: one tensor per tie group
    return ShardPlan((*kept, ""), tuple(merged))


def _every_parameter_gets_a_gradient(module: nn.Module, inner: list[str], path: str) -> None:
    """Give ``module``'s output a zero term over the parameters its unit manages."""
    offset = len(path) + 1 if path else 0
    inner_rel = [u[offset:] for u in inner]
    own = [(m, attr) for sub, m in module.named_modules(remove_duplicate=True)
           if not any(sub == u or sub.startswith(u + ".") for u in inner_rel)
           for attr, p in m._parameters.items() if p is not None and p.requires_grad]

    def hook(_: nn.Module, args: Any, output: Any) -> Any:
        if not torch.is_grad_enabled() or not own:
            return output
        leaves, spec = tree_flatten(output)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad and \
                    leaf.is_floating_point():
                zero = torch.stack([m._parameters[a].sum() for m, a in own]).sum() * 0.0
                leaves[i] = leaf + zero.to(leaf.dtype)
                return tree_unflatten(leaves, spec)
        return output

    module.register_forward_hook(hook)


class _Usage:
    """Which modules holding parameters were called in this step, on any rank."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules()
                        if any(p is not None for p in m._parameters.values())]
        self.called = torch.zeros(len(self.modules))
        for i, m in enumerate(self.modules):
            m.register_forward_pre_hook(lambda *_, i=i: self.called.__setitem__(i, 1.0))

    def forget(self) -> None:
        params = list({id(p): p for m in self.modules for p in m._parameters.values()
                       if p is not None}.values())
        nonzero = [p.grad.to_local().ne(0).any() if p.grad is not None else
                   torch.zeros((), dtype=torch.bool) for p in params]
        flags = torch.cat([self.called, torch.stack(nonzero).float()]) if params else \
            self.called.clone()
        dist.all_reduce(flags)  # called on any rank; a non-zero gradient in any shard
        called = flags[:len(self.modules)].tolist()
        live = {id(p) for p, f in zip(params, flags[len(self.modules):].tolist(), strict=True)
                if f}
        used = {id(p) for m, c in zip(self.modules, called, strict=True) if c
                for p in m._parameters.values() if p is not None}
        for m, c in zip(self.modules, called, strict=True):
            if not c:  # no rank called it, and its gradient is zero everywhere: unused
                for p in m._parameters.values():
                    if p is not None and id(p) not in used and id(p) not in live:
                        p.grad = None
        self.called.zero_()


def forget_unused(model: nn.Module) -> None:
    """After backward: gradients of parameters no rank used this step back to None.

    For a model sharded by :func:`shard`; a collective, so every rank calls it.
    """
    usage = _USAGE.get(model)
    if usage is not None:
        usage.forget()
