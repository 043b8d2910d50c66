"""Saving and loading tied models: safetensors plus a tie manifest, never pickle."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import safetensors
import safetensors.torch
import torch
from torch import nn

from adaptnet._io import atomic_path
from adaptnet._tree import get_module, walk
from adaptnet.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from adaptnet.sharing._discover import declared_owners, pick_owner
from adaptnet.sharing._registry import apply_transform, compose, normalize_transform
from adaptnet.sharing._share import share
from adaptnet.sharing._slots import (
    Slot,
    group_by_tensor,
    iter_slots,
    relative_transform,
)
from adaptnet.sharing._tie import retie, tie

__all__ = ["load", "save"]

META_KEY = "adaptnet"
VERSION = 1
M = TypeVar("M", bound=nn.Module)


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a model's parameters and persistent buffers, and its ties, to safetensors.

    Each distinct tensor is stored once (``safetensors.torch.save_file``
    refuses shared tensors; ``torch.save`` needs pickle). The ties — declared
    or found by identity, transposed ones included, and shared submodules — go
    in a versioned manifest in the file's metadata, so :func:`load` can restore
    them into a model built with or without them. The file is written
    atomically: a crash leaves the previous file intact. A model sharded
    with :func:`adaptnet.shard` (FSDP2) is saved whole: every rank must call
    ``save`` (each shard is gathered), rank 0 writes the file, and every rank
    returns once it is written (or raises :class:`CheckpointError` if it could not be).

    Returns:
        The path written.

    Raises:
        CheckpointError: the model has tensors on the ``meta`` device; sharded, rank 0
            could not write the file (raised on every rank).

    Example:
        >>> import tempfile, torch.nn as nn, adaptnet
        >>> layer = nn.Linear(4, 4)
        >>> path = adaptnet.save(nn.Sequential(layer, layer), tempfile.mkdtemp() + "/m.safetensors")
        >>> fresh = adaptnet.load(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), path)
        >>> fresh[0] is fresh[1]
        True
    """
    if not isinstance(path, str | os.PathLike) or Path(path).is_dir():
        what = "a directory" if isinstance(path, str | os.PathLike) else type(path).__name__
        raise CheckpointError(f"save(): path must be a file path (e.g. 'model.safetensors'), "
                              f"got {what}.")
    slots = list(iter_slots(model, buffers=True))
    meta = [s.name for s in slots if s.tensor.device.type == "meta"]
    if meta:
        raise CheckpointError(
            f"save(): {len(meta)} tensor(s) are on the meta device and hold no data "
            f"({', '.join(meta[:5])}); materialise the model first (to_empty + init, or "
            "adaptnet.load)."
        )
    declared = declared_owners(model)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, list] = {}
    seen_memory: set[int] = set()
    sharded = any(_sharded(s.tensor) for s in slots)
    for group in group_by_tensor(slots):
        owner = pick_owner(group, declared)
        whole = owner.tensor.full_tensor() if _sharded(owner.tensor) else \
            owner.tensor  # a sharded (FSDP2) tensor: gathered from every rank
        value = apply_transform(owner.transform, whole).detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in seen_memory:  # overlapping views: copy
            value = value.clone()
        seen_memory.add(value.untyped_storage().data_ptr())
        tensors[owner.name] = value
        for s in group:
            if s is not owner:
                aliases[s.name] = [owner.name, relative_transform(s, owner)]
    manifest = {"version": VERSION, "aliases": aliases, "modules": _module_shares(model)}
    if not sharded:
        _write(tensors, manifest, path)
        return Path(path)
    # every rank gathers; rank 0 writes, and every rank returns once the file is there (a
    # rank that went on at once could load it before it exists), or raises if it failed
    failure = [None]
    if torch.distributed.get_rank() == 0:
        try:
            _write(tensors, manifest, path)
        except OSError as e:
            failure = [f"{type(e).__name__}: {e}"]
    torch.distributed.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise CheckpointError(f"save(): rank 0 could not write {str(path)!r}: {failure[0]}.")
    return Path(path)


def _write(tensors: dict[str, torch.Tensor], manifest: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata={META_KEY: json.dumps(manifest)})


def load(model: M, path: str | os.PathLike | Mapping[str, torch.Tensor], *,
         cast: bool = False, source: str | os.PathLike | None = None) -> M:
    """Load a file written by :func:`save` into ``model``, restoring its ties.

    The model may be built with or without the ties: those in the file are
    re-established (:func:`adaptnet.tie`, :func:`adaptnet.share`), then values
    are copied in. Tensors on the ``meta`` device are materialised on the CPU
    from the file, so ``with torch.device("meta"): model = build()`` followed by
    ``load`` allocates once. Everything is checked before the model is
    touched; all problems are reported together. Plain safetensors files (no
    manifest) load too, and so does a state dict (``{name: tensor}``, e.g. from
    ``torch.load(..., weights_only=True)``), with the same checks. Nothing is
    unpickled. Into a model sharded with :func:`adaptnet.shard`, every rank
    reads the file and keeps its own shard (no communication).

    Args:
        model: the model to load into.
        path: a safetensors file, or a state dict.
        cast: allow stored tensors whose dtype differs from the model's (they
            are converted). Off by default: a float32 model does not silently
            take int64 or relabelled bytes.
        source: for a state dict, where it came from (a ``.pt`` file), named in
            error messages instead of ``<state dict>``.

    Returns:
        ``model``, loaded.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        CheckpointCorruptError: truncated, not safetensors, or a bad manifest.
        CheckpointMismatchError: missing or unexpected names, shape or dtype
            mismatches, tensors tied in the model (or claimed tied, or claimed
            one module, in the file) whose stored values differ.

    Example:
        >>> import tempfile, torch, torch.nn as nn, adaptnet
        >>> def lm():
        ...     return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        >>> net = lm()
        >>> _ = adaptnet.tie(net, "1.weight", "0.weight")
        >>> path = adaptnet.save(net, tempfile.mkdtemp() + "/lm.safetensors")
        >>> fresh = adaptnet.load(lm(), path)  # built untied: the file's tie comes back
        >>> fresh[1].weight is fresh[0].weight, torch.equal(fresh[0].weight, net[0].weight)
        (True, True)
    """
    if isinstance(path, Mapping):
        stored, aliases, modules = dict(path), {}, {}
        bad = [str(k) for k, v in stored.items()
               if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointCorruptError(f"load(): a state dict maps names (str) to tensors; "
                                         f"{', '.join(bad[:5])} do not.")
        path = Path(source if source is not None else "<state dict>")
    elif not isinstance(path, str | os.PathLike):
        raise CheckpointError(f"load(): expected a file path or a state dict, got "
                              f"{type(path).__name__}.")
    else:
        path = Path(path)
        if not path.is_file():
            raise CheckpointNotFoundError(f"load(): no checkpoint at {str(path)!r}.")
        stored, aliases, modules = _read(path)

    def source(name: str) -> tuple[str, str | None]:  # (stored name, transform)
        return (name, None) if name in stored else (aliases[name][0], aliases[name][1])

    def value(name: str) -> torch.Tensor:  # a name's tensor as its module sees it
        owner, transform = source(name)
        return apply_transform(transform, stored[owner])

    slots = list(iter_slots(model, buffers=True))
    target = {s.name: s for s in slots}
    in_file = set(stored) | set(aliases)
    groups = group_by_tensor(slots)
    # A tied tensor is satisfied by any of its names (files from save_model drop aliases).
    missing = [s.name for g in groups if not any(s.name in in_file for s in g) for s in g]
    unexpected = sorted(in_file - set(target))
    problems = [
        f"{n}: the file has shape {list(value(n).shape)}, the model {list(target[n].shape)}"
        for n in sorted(in_file & set(target)) if tuple(value(n).shape) != target[n].shape
    ]
    for name in sorted(set(stored) & set(aliases)):
        via = apply_transform(aliases[name][1], stored[aliases[name][0]])
        if stored[name].shape != via.shape or not torch.equal(stored[name], via):
            problems.append(f"{name}: the manifest ties it to {aliases[name][0]!r}, but the "
                            "file stores different values for it")
    if not cast:
        problems += [f"{n}: the file has dtype {str(value(n).dtype).removeprefix('torch.')}, "
                     f"the model {str(target[n].tensor.dtype).removeprefix('torch.')} (pass "
                     "cast=True to convert)" for n in sorted(in_file & set(target))
                     if value(n).dtype != target[n].tensor.dtype]
    if not problems:
        problems += _tied_value_conflicts(groups, in_file, source, value)
    known = dict(walk(model))
    problems += [f"modules {m!r} and {o!r}: not both submodules of the model"
                 for m, o in modules.items() if m not in known or o not in known]
    if not problems:
        problems += _module_claim_conflicts(modules, in_file, value)
    if missing or unexpected or problems:
        raise mismatch_error("load()", path, model, missing, unexpected, problems)

    for member, owner in modules.items():
        if get_module(model, member) is not get_module(model, owner):
            share(model, [member], owner=owner)
    target = {s.name: s for s in iter_slots(model, buffers=True)}
    for name, (owner, transform) in aliases.items():
        m, o = target[name], target[owner]
        if m.is_buffer or o.is_buffer:
            continue  # buffers are not tied; each gets the value
        if m.tensor is not o.tensor or relative_transform(m, o) != transform:
            tie(model, name, owner, transform)
    for group in group_by_tensor(list(iter_slots(model, buffers=True))):
        src = next(s for s in sorted(group, key=lambda s: s.name not in stored)
                   if s.name in in_file)
        data = apply_transform(src.transform, value(src.name))  # in the tensor's frame
        if group[0].tensor.device.type == "meta":
            _materialise(group, data)
        else:
            with torch.no_grad():
                for t in {id(s.tensor): s.tensor for s in group}.values():
                    if _sharded(t):  # this rank's shard of the file's tensor
                        from torch.distributed.tensor import distribute_tensor

                        t.to_local().copy_(distribute_tensor(
                            data.to(t.dtype), t.device_mesh, t.placements,
                            src_data_rank=None).to_local())
                    else:
                        t.copy_(data)
    retie(model)
    return model


def _sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is an FSDP2 shard (a DTensor); cheap when torch.distributed is unused."""
    if "torch.distributed.tensor" not in sys.modules:  # nothing made a DTensor yet
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointCorruptError(
            f"load(): {str(path)!r} is not a readable safetensors file ({e}). It may be "
            "truncated or corrupt; restore it from a backup or save the model again."
        ) from None
    if META_KEY not in metadata:
        return stored, {}, {}
    try:
        manifest = json.loads(metadata[META_KEY])
        version = manifest["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version {version!r} is not a version number")
        if version > VERSION:
            raise CheckpointCorruptError(
                f"load(): {str(path)!r} has tie manifest version {version!r}; this adaptnet "
                f"reads version {VERSION} and below. Upgrade adaptnet to load it."
            )
        aliases = {}
        for k, v in manifest["aliases"].items():
            if not isinstance(v, list) or len(v) != 2 or not isinstance(v[0], str):
                raise ValueError(f"alias {k!r} is {v!r}, not [owner, transform]")
            aliases[str(k)] = [v[0], normalize_transform(v[1])]
        modules = {str(k): str(v) for k, v in manifest["modules"].items()}
    except CheckpointCorruptError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointCorruptError(
            f"load(): {str(path)!r} has a malformed adaptnet tie manifest ({type(e).__name__}: "
            f"{e}); the file was altered or not written by adaptnet.save."
        ) from None
    dangling = sorted(k for k, (owner, _) in aliases.items() if owner not in stored)
    if dangling:
        raise CheckpointCorruptError(
            f"load(): {str(path)!r}: the manifest ties {dangling} to tensors the file does "
            "not contain; the file is incomplete or altered."
        )
    flat = sorted(k for k, (owner, how) in aliases.items()
                  if how == "transpose" and stored[owner].dim() < 2)
    if flat:
        raise CheckpointCorruptError(
            f"load(): {str(path)!r}: the manifest ties {flat} to the transpose of tensors "
            "with fewer than 2 dimensions, which have none; the file was altered or not "
            "written by adaptnet.save."
        )
    return stored, aliases, modules


def _tied_value_conflicts(groups: list[list[Slot]], in_file: set[str], source, value
                          ) -> list[str]:
    """Names the model ties together but the file gives different values."""
    out = []
    for group in groups:
        present = [s for s in group if s.name in in_file]
        if len(present) < 2:
            continue
        ref = present[0]
        ref_value = apply_transform(ref.transform, value(ref.name))  # in the tensor's frame

        def frame(s: Slot) -> tuple[str, str | None]:  # stored tensor + transform to this frame
            name, transform = source(s.name)
            return name, compose(s.transform, transform)

        for s in present[1:]:
            if frame(s) == frame(ref):
                continue  # the file ties them too: equal by construction
            if not torch.equal(apply_transform(s.transform, value(s.name)), ref_value):
                out.append(
                    f"{s.name}: the model ties it to {ref.name!r}, but the file holds different "
                    "values for them (load into a model built without this tie, or "
                    "adaptnet.untie it first)"
                )
    return out


def _module_claim_conflicts(modules: dict[str, str], in_file: set[str], value) -> list[str]:
    """Module shares the manifest claims but the stored values contradict."""
    out = []
    for member, owner in modules.items():
        for name in sorted(n for n in in_file if n.startswith(member + ".")):
            twin = owner + name[len(member):]
            if twin in in_file and (value(name).shape != value(twin).shape
                                    or not torch.equal(value(name), value(twin))):
                out.append(f"{name}: the manifest says module {member!r} is {owner!r}, but the "
                           f"file holds different values for {name!r} and {twin!r} (the file "
                           "was altered or not written by adaptnet.save)")
    return out


def _materialise(group: list[Slot], data: torch.Tensor) -> None:
    old = group[0].tensor
    new = data.to(dtype=old.dtype).clone()
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    for s in group:
        if s.transform is not None:
            s.module.parametrizations[s.attr].original = new
        elif s.is_buffer:
            s.module._buffers[s.attr] = new
        else:
            s.module._parameters[s.attr] = new


def _module_shares(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    out = {}
    for path, module in walk(model):
        if not path:
            continue
        if id(module) in first:
            out[path] = first[id(module)]
        else:
            first[id(module)] = path
    # Submodules of a shared module are implied by it.
    return {m: o for m, o in out.items()
            if not any(m.startswith(p + ".") for p in out)}


def mismatch_error(caller: str, path: Path, model: nn.Module, missing: list[str],
                   unexpected: list[str], problems: list[str]) -> CheckpointMismatchError:
    """The error for a file that does not fit ``model``, every mismatch listed."""
    lines = [f"{caller}: {str(path)!r} does not fit {type(model).__name__}:"]
    if missing:
        lines.append(f"  missing from the file ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {', '.join(unexpected)}")
    lines += [f"  {p}" for p in problems]
    lines.append("Load into a model built with the same architecture and arguments as the one "
                 "saved; adaptnet.summary(model) lists the model's names.")
    return CheckpointMismatchError("\n".join(lines), missing=tuple(missing),
                                   unexpected=tuple(unexpected), problems=tuple(problems))
