"""Per-sample routing: each sample runs only the path it takes.

``switch`` partitions a batch by a per-sample index: it gathers the samples
of each path, calls the path once on that sub-batch, and scatters the results
back into the original order with one gather. Autograd flows through every
path taken; paths no sample takes are never called, so they cost nothing and
cannot leak NaNs into outputs or gradients (masking with ``torch.where``
does both: it pays for every path and back-propagates NaNs from the untaken
one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree  # what torch.func and torch.export use
from torch import nn

from adaptnet.dynamic._guards import refuse_tracing
from adaptnet.dynamic._ledger import active_rows
from adaptnet.errors import RoutingError

__all__ = ["branch", "switch"]


def branch(pred: torch.Tensor, then_fn: Callable, else_fn: Callable, *inputs: Any) -> Any:
    """Per-sample ``if``: samples with ``pred`` True run ``then_fn``, the others ``else_fn``.

    Args:
        pred: bool tensor of shape ``(B,)``.
        then_fn, else_fn: called as ``fn(*sub_inputs)`` on the samples of their path;
            they must treat samples independently (no batch statistics) and
            return tensors (or tuples/lists/dicts of tensors) with a leading
            batch dimension; both must agree in structure, ``shape[1:]`` and dtype.
        *inputs: tensors with a leading batch dimension ``B``, or nested
            tuples/lists/dicts of them; every tensor of one or more dimensions
            is split per sample (its first dimension must be ``B``). Python
            values and 0-d tensors are passed whole. Tensors shared by the whole
            batch (weights, biases, buffers) belong in the paths' closures or
            modules: an ``nn.Parameter`` input is refused; any other tensor
            with ``B`` rows is taken as per-sample, since adaptnet cannot tell
            it from one.

    Returns:
        The paths' outputs merged in the original sample order.

    Raises:
        RoutingError: ``pred`` not a 1-D bool tensor, a tensor input without
            ``B`` rows, an ``nn.Parameter`` input, or paths whose outputs disagree.
        DynamicError: called under ``torch.jit.trace``.

    Example:
        >>> import torch, adaptnet
        >>> x = torch.tensor([[1.0], [-2.0], [3.0]])
        >>> adaptnet.branch(x[:, 0] > 0, lambda v: v * 10, lambda v: -v, x)
        tensor([[10.],
                [ 2.],
                [30.]])
    """
    if not isinstance(pred, torch.Tensor) or pred.dtype != torch.bool:
        got = f"a {pred.dtype} tensor" if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise RoutingError(
            f"branch(): pred must be a bool tensor of shape (B,), got {got}; compare to "
            "make one (e.g. x.sum(1) > 0), or use switch() for integer paths."
        )
    if not (callable(then_fn) and callable(else_fn)):
        raise RoutingError(f"branch(): then_fn and else_fn must be callables (functions or "
                           f"modules), got {type(then_fn).__name__} and "
                           f"{type(else_fn).__name__}.")
    return _route(pred, (else_fn, then_fn), inputs, ("else_fn", "then_fn"), "branch", "pred")


def switch(index: torch.Tensor, fns: Sequence[Callable], *inputs: Any) -> Any:
    """Per-sample ``switch``: sample ``i`` runs ``fns[index[i]]``.

    Args:
        index: integer tensor of shape ``(B,)`` with values in ``[0, len(fns))``.
        fns: the paths; see :func:`branch` for what they must return.
        *inputs: as in :func:`branch`.

    Returns:
        The paths' outputs merged in the original sample order.

    Raises:
        RoutingError: ``index`` not a 1-D integer tensor, a value out of range,
            a tensor input without ``B`` rows, or paths whose outputs disagree.

    Example:
        >>> import torch, adaptnet
        >>> fns = [lambda v: v, lambda v: v * 10, lambda v: v * 100]
        >>> adaptnet.switch(torch.tensor([2, 0, 1]), fns, torch.ones(3, 1)).flatten()
        tensor([100.,   1.,  10.])
    """
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or \
            index.dtype.is_complex or index.dtype == torch.bool:
        got = f"a {index.dtype} tensor" if isinstance(index, torch.Tensor) else \
            type(index).__name__
        raise RoutingError(
            f"switch(): index must be an integer tensor of shape (B,), got {got}; use "
            "index.long(), or branch() for a bool predicate."
        )
    fns = list(fns)
    if not fns or not all(callable(f) for f in fns):
        raise RoutingError(f"switch(): fns must be a non-empty sequence of callables, got "
                           f"{[type(f).__name__ for f in fns] or 'an empty sequence'}.")
    return _route(index, fns, inputs, tuple(f"fns[{k}]" for k in range(len(fns))), "switch",
                  "index")


def _route(index: torch.Tensor, fns: Sequence[Callable], inputs: tuple, names: tuple[str, ...],
           caller: str, arg: str) -> Any:
    if index.dim() != 1:
        raise RoutingError(f"{caller}(): {arg} must have shape (B,), got {list(index.shape)}; "
                           f"give one decision per sample (e.g. {arg}.view(-1) or {arg}.any(1)).")
    refuse_tracing(f"{caller}()")
    B = index.shape[0]
    leaves, spec = pytree.tree_flatten(inputs)
    batched = [isinstance(v, torch.Tensor) and v.dim() >= 1 for v in leaves]
    shared = [(j, list(v.shape)) for j, v in enumerate(leaves) if isinstance(v, nn.Parameter)]
    if shared:
        raise RoutingError(
            f"{caller}(): input(s) {shared} (position, shape) are nn.Parameters. Every tensor "
            "input is split per sample, and a parameter is shared by the whole batch: use it "
            "inside the path functions (close over it or its module) instead of passing it.")
    if not any(batched):
        raise RoutingError(
            f"{caller}(): got no tensor inputs to split; pass the per-sample tensors after "
            "the paths (Python values and 0-d tensors are passed whole)."
        )
    wrong = [(j, list(v.shape)) for j, (v, b) in enumerate(zip(leaves, batched, strict=True))
             if b and v.shape[0] != B]
    if wrong:
        raise RoutingError(
            f"{caller}(): {arg} has batch size {B}, but input tensor(s) {wrong} (position, "
            f"shape) do not have {B} rows. Every tensor input is split per sample; give "
            f"{arg} one entry per sample, and close over tensors shared by the whole batch "
            "(weights, biases) in the path functions instead of passing them."
        )
    n = len(fns)
    key = index.long()  # also for uint16/32/64, which have no min/max kernels
    if B and caller == "switch":
        lo, hi = int(key.min()), int(key.max())
        if lo < 0 or hi >= n:
            raise RoutingError(f"switch(): index values must lie in [0, {n}) for {n} fns, got "
                               f"values from {lo} to {hi}.")
    parts, taken, outs = [], [], []
    for k in range(n):
        idx = (key == k).nonzero().squeeze(1)  # (B_k,), ascending
        if idx.numel() == 0 and not (B == 0 and k == 0):
            continue  # nobody takes this path: never call it (an empty batch runs path 0)
        if idx.numel() == B:  # every sample: no gather, no scatter
            sub = leaves
        else:
            sub = [v.index_select(0, idx) if b else v
                   for v, b in zip(leaves, batched, strict=True)]
        with active_rows(idx):
            out = fns[k](*pytree.tree_unflatten(sub, spec))
        parts.append(idx)
        taken.append(k)
        outs.append(out)
    out_leaves, out_spec = _check_outputs(outs, parts, taken, names, caller)
    if len(parts) == 1:
        return outs[0]
    merged = merge_rows(parts, *(list(column) for column in zip(*out_leaves, strict=True)))
    return pytree.tree_unflatten(merged, out_spec)


def merge_rows(ids: list[torch.Tensor], *columns: list[torch.Tensor]) -> list[torch.Tensor]:
    """Put row blocks back in input order with one gather per column.

    ``ids[j]`` are the input rows of block ``j`` (together, each row exactly
    once); each column lists one tensor per block, with matching rows.
    """
    order = torch.cat(ids)  # position in the concatenation -> input row
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return [torch.cat(column).index_select(0, inverse) for column in columns]


def _check_outputs(outs: list, parts: list[torch.Tensor], taken: list[int],
                   names: tuple[str, ...], caller: str) -> tuple[list[list], Any]:
    """Flatten every path's output and check they can be merged; return the leaves and spec."""
    flat = [pytree.tree_flatten(o) for o in outs]
    first_name, (first_leaves, first_spec) = names[taken[0]], flat[0]
    for k, (leaves, _), idx in zip(taken, flat, parts, strict=True):
        for j, v in enumerate(leaves):
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != len(idx):
                got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise RoutingError(
                    f"{caller}(): {names[k]} was called on {len(idx)} sample(s) and returned "
                    f"{got} at output {j}; each path must return tensors with one row per "
                    "sample it was given."
                )
    for k, (leaves, spec) in zip(taken[1:], flat[1:], strict=True):
        if spec != first_spec:
            raise RoutingError(f"{caller}(): {names[k]} returned {_shape_of(spec)} but "
                               f"{first_name} returned {_shape_of(first_spec)}; all paths must "
                               "return the same structure.")
        for j, (a, b) in enumerate(zip(leaves, first_leaves, strict=True)):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise RoutingError(
                    f"{caller}(): {names[k]} returned (B, {', '.join(map(str, a.shape[1:]))}) "
                    f"{a.dtype} at output {j} but {first_name} returned "
                    f"(B, {', '.join(map(str, b.shape[1:]))}) {b.dtype}; paths must agree in "
                    "shape after the batch dimension and in dtype."
                )
    return [leaves for leaves, _ in flat], first_spec


class _Leaf:
    def __repr__(self) -> str:
        return "Tensor"


def _shape_of(spec: Any) -> str:
    """A readable structure, e.g. ``(Tensor, {'h': Tensor})``."""
    return repr(pytree.tree_unflatten([_Leaf()] * spec.num_leaves, spec))
