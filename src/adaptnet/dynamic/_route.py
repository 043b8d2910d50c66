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
from adaptnet.dynamic._ledger import charged
from adaptnet.dynamic._partition import top, write_rows
from adaptnet.errors import DynamicError, RoutingError

__all__ = ["branch", "route_topk", "switch"]


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
    if len(inputs) == 1 and type(inputs[0]) is torch.Tensor and pred.dim() == 1 and \
            inputs[0].dim() >= 1 and inputs[0].shape[0] == pred.shape[0]:
        # One plain tensor: the partition with no structure to walk, written here rather
        # than in a helper so that under torch.compile each nonzero breaks the graph once.
        refuse_tracing("branch()")
        x, B = inputs[0], inputs[0].shape[0]
        off = (~pred).nonzero().squeeze(1)
        if off.shape[0] == B:  # nobody takes then_fn (and an empty batch runs else_fn)
            return charged(off, else_fn, x)
        on = pred.nonzero().squeeze(1)
        if on.shape[0] == B:
            return charged(on, then_fn, x)
        b = charged(off, else_fn, x.index_select(0, off))  # paths in _route's order
        a = charged(on, then_fn, x.index_select(0, on))
        if type(a) is torch.Tensor and type(b) is torch.Tensor and a.dim() and b.dim() and \
                a.shape[0] == on.shape[0] and b.shape[0] == off.shape[0] and \
                a.shape[1:] == b.shape[1:] and a.dtype == b.dtype:
            out = a.new_empty((B, *a.shape[1:]))
            out.index_copy_(0, off, b)
            return out.index_copy_(0, on, a)
        return _merge([b, a], [off, on], B, ("else_fn", "then_fn"), "branch")
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


def route_topk(scores: torch.Tensor, k: int, fn: Callable[[torch.Tensor], torch.Tensor],
               x: torch.Tensor, *, other: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor:
    """Capacity routing: only the ``k`` highest-scoring rows run ``fn``; shapes stay static.

    The rows are chosen by ``torch.topk`` of ``scores`` (among equal scores,
    topk's choice), so the sub-batches always have ``k`` and ``B - k`` rows, whatever
    the scores: the call compiles with ``torch.compile(fullgraph=True)``,
    exports with ``torch.export`` and never reads a tensor on the host
    (Mixture-of-Depths' expert-choice top-k). The choice is not differentiable;
    to train the scorer, scale ``fn``'s output by a function of the score
    inside ``fn`` (as Mixture-of-Depths scales by the router weight).

    Args:
        scores: ``(B,)`` floating-point scores.
        k: rows that run ``fn``, ``0 <= k <= B``.
        fn: maps ``(k, ...)`` rows to ``(k, ...)`` outputs, row by row.
        x: ``(B, ...)`` input rows.
        other: runs the other ``B - k`` rows; ``None`` passes them through
            unchanged (``fn`` must then keep ``x``'s shape and dtype).

    Returns:
        ``(B, ...)``: ``fn``'s rows and ``other``'s (or ``x``'s) in input order.

    Raises:
        DynamicError: ``scores`` not a floating ``(B,)`` tensor for ``x``'s
            ``B`` rows, ``k`` not an integer in ``[0, B]``, a non-callable path,
            or outputs that cannot be merged.

    Example:
        >>> import torch, adaptnet
        >>> x = torch.arange(4.0).view(4, 1)
        >>> adaptnet.route_topk(x[:, 0], 2, lambda v: v * 10, x).flatten()
        tensor([ 0.,  1., 20., 30.])
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        got = f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DynamicError(f"route_topk(): x must be a (B, ...) tensor of rows, got {got}.")
    B = x.shape[0]
    if not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point or \
            tuple(scores.shape) != (B,):
        got = f"a {scores.dtype} tensor of shape {list(scores.shape)}" if \
            isinstance(scores, torch.Tensor) else type(scores).__name__
        raise DynamicError(f"route_topk(): scores must be a floating tensor of shape ({B},), "
                           f"one score per row of x, got {got}; e.g. router(x).squeeze(-1).")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= B:
        raise DynamicError(f"route_topk(): k must be an integer from 0 to the batch size {B}, "
                           f"got {k!r}; for a fraction c of the batch use math.ceil(c * B).")
    if not callable(fn) or not (other is None or callable(other)):
        raise DynamicError("route_topk(): fn (and other, when given) must be callables.")
    chosen, rest = top(scores.detach(), k)
    y = charged(chosen, fn, x.index_select(0, chosen))
    if other is None:
        if not isinstance(y, torch.Tensor) or y.shape[1:] != x.shape[1:] or y.dtype != x.dtype:
            got = f"{list(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else \
                type(y).__name__
            raise DynamicError(f"route_topk(): without other, the rows not chosen pass through "
                               f"unchanged, so fn must keep x's shape and dtype ({k}, "
                               f"{', '.join(map(str, x.shape[1:]))}) {x.dtype}; it returned "
                               f"{got}. Give other= for the rest, or make fn residual.")
        return x.index_copy(0, chosen, y)
    z = charged(rest, other, x.index_select(0, rest))
    _check_outputs([[y], [z]], [chosen, rest], [0, 1], ("fn", "other"), "route_topk")
    return write_rows(write_rows(None, chosen, y, B), rest, z, B)


def _route(index: torch.Tensor, fns: Sequence[Callable], inputs: tuple, names: tuple[str, ...],
           caller: str, arg: str) -> Any:
    if index.dim() != 1:
        raise RoutingError(f"{caller}(): {arg} must have shape (B,), got {list(index.shape)}; "
                           f"give one decision per sample (e.g. {arg}.view(-1) or {arg}.any(1)).")
    refuse_tracing(f"{caller}()")
    B = index.shape[0]
    if all(type(v) is torch.Tensor for v in inputs):  # the lean path: no pytree walk
        leaves, spec = list(inputs), None
    else:
        leaves, spec = pytree.tree_flatten(inputs)
    batched = [isinstance(v, torch.Tensor) and v.dim() >= 1 for v in leaves]
    _check_inputs(leaves, batched, B, caller, arg)
    n = len(fns)
    if index.dtype == torch.bool:
        masks = [~index, index]
    else:
        key = index.long()  # also for uint16/32/64, which have no min/max kernels
        if B:
            lo, hi = int(key.min()), int(key.max())
            if lo < 0 or hi >= n:
                raise RoutingError(f"switch(): index values must lie in [0, {n}) for {n} fns, "
                                   f"got values from {lo} to {hi}.")
        masks = [key == k for k in range(n)]
    parts, taken, outs = [], [], []
    for k in range(n):
        ran = _path(masks[k], fns[k], leaves, batched, spec, B, k == 0)
        if ran is not None:
            parts.append(ran[0])
            outs.append(ran[1])
            taken.append(k)
    return _merge(outs, parts, B, tuple(names[k] for k in taken), caller)


def _merge(outs: list, parts: list[torch.Tensor], B: int, names: tuple[str, ...],
           caller: str) -> Any:
    """The paths' outputs, checked, written into ``(B, ...)`` outputs in input order."""
    taken = list(range(len(outs)))
    if all(type(o) is torch.Tensor for o in outs):  # the lean path: no pytree walk
        out_leaves, out_spec = [[o] for o in outs], None
    else:
        out_leaves, out_spec = _flatten_outputs(outs, taken, names, caller)
    _check_outputs(out_leaves, parts, taken, names, caller)
    if len(parts) == 1:
        return outs[0]
    merged = []
    for column in zip(*out_leaves, strict=True):
        out = None
        for idx, values in zip(parts, column, strict=True):
            out = write_rows(out, idx, values, B)
        merged.append(out)
    return merged[0] if out_spec is None else pytree.tree_unflatten(merged, out_spec)


def _path(mask: torch.Tensor, fn: Callable, leaves: list, batched: list[bool], spec: Any,
          B: int, first: bool) -> tuple[torch.Tensor, Any] | None:
    """``(rows, fn(rows' inputs))`` for the rows in ``mask``; None when no row takes it.

    One function per path, so that under ``torch.compile`` the path's ``nonzero``
    is its only graph break.
    """
    idx = mask.nonzero().squeeze(1)  # (B_k,), ascending
    if idx.shape[0] == 0 and not (B == 0 and first):
        return None  # nobody takes this path: never call it (an empty batch runs path 0)
    if idx.shape[0] == B:  # every sample: no gather, no write-back
        sub = leaves
    else:
        sub = [v.index_select(0, idx) if b else v for v, b in zip(leaves, batched, strict=True)]
    return idx, charged(idx, fn, *(sub if spec is None else pytree.tree_unflatten(sub, spec)))


def _check_inputs(leaves: list, batched: list[bool], B: int, caller: str, arg: str) -> None:
    shared = [(j, list(v.shape)) for j, v in enumerate(leaves) if isinstance(v, nn.Parameter)]
    if shared:
        raise RoutingError(
            f"{caller}(): input(s) {shared} (position, shape) are nn.Parameters. Every tensor "
            "input is split per sample, and a parameter is shared by the whole batch: use it "
            "inside the path functions (close over it or its module) instead of passing it.")
    if True not in batched:
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


def _flatten_outputs(outs: list, taken: list[int], names: tuple[str, ...], caller: str
                     ) -> tuple[list[list], Any]:
    """Every path's output leaves, and the structure they all share."""
    flat = [pytree.tree_flatten(o) for o in outs]
    first_name, first_spec = names[taken[0]], flat[0][1]
    for k, (_, spec) in zip(taken[1:], flat[1:], strict=True):
        if spec != first_spec:
            raise RoutingError(f"{caller}(): {names[k]} returned {_shape_of(spec)} but "
                               f"{first_name} returned {_shape_of(first_spec)}; all paths must "
                               "return the same structure.")
    return [leaves for leaves, _ in flat], first_spec


def _check_outputs(out_leaves: list[list], parts: list[torch.Tensor], taken: list[int],
                   names: tuple[str, ...], caller: str) -> None:
    """Each path returned one row per sample it was given, and all agree after the batch dim."""
    first_name, first_leaves = names[taken[0]], out_leaves[0]
    for k, leaves, idx in zip(taken, out_leaves, parts, strict=True):
        for j, v in enumerate(leaves):
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != idx.shape[0]:
                got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise RoutingError(
                    f"{caller}(): {names[k]} was called on {idx.shape[0]} sample(s) and "
                    f"returned {got} at output {j}; each path must return tensors with one row "
                    "per sample it was given."
                )
    for k, leaves in zip(taken[1:], out_leaves[1:], strict=True):
        for j, (a, b) in enumerate(zip(leaves, first_leaves, strict=True)):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise RoutingError(
                    f"{caller}(): {names[k]} returned (B, {', '.join(map(str, a.shape[1:]))}) "
                    f"{a.dtype} at output {j} but {first_name} returned "
                    f"(B, {', '.join(map(str, b.shape[1:]))}) {b.dtype}; paths must agree in "
                    "shape after the batch dimension and in dtype."
                )


class _Leaf:
    def __repr__(self) -> str:
        return "Tensor"


def _shape_of(spec: Any) -> str:
    """A readable structure, e.g. ``(Tensor, {'h': Tensor})``."""
    return repr(pytree.tree_unflatten([_Leaf()] * spec.num_leaves, spec))
