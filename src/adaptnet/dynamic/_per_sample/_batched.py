"""Running one straight-line segment on all samples of a frame at once.

Three ways, tried in this order:

1. no tensor input: the segment cannot depend on the sample, so it runs once
   as plain Python and its tensors are repeated for every sample;
2. the row-wise fast path (``_rowwise.py``): the segment runs on the batched
   tensors directly while a ``TorchFunctionMode`` lets through only operations
   it knows act on each row alone (rewriting ``dim`` arguments); anything else
   aborts it before it executes, and the segment falls back to
3. ``torch.func.vmap`` with ``randomness="different"`` (each sample draws its own
   dropout mask, as in the per-sample loop): always correct, slower.

A segment that once needs ``vmap`` keeps using it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.func import vmap

from adaptnet.dynamic._ledger import active_rows, current_ledger
from adaptnet.dynamic._per_sample._rowwise import NotRowwise, rowwise
from adaptnet.errors import PerSampleError

__all__ = ["INSIDE", "run_segment"]

INSIDE: ContextVar[bool] = ContextVar("adaptnet_per_sample_segment", default=False)

_DATA_DEPENDENT = ("data-dependent control flow", "calling .item()")


def run_segment(fn: Callable, args: list, writes: frozenset[str], n: int,
                rows: torch.Tensor | None, fast: list[bool], index: int, filename: str
                ) -> dict[str, Any]:
    """Call the segment ``fn(*args)`` for ``n`` samples; return its batched locals."""
    token = INSIDE.set(True)
    try:
        return _segment(fn, args, writes, n, rows, fast, index, filename)
    finally:
        INSIDE.reset(token)


def _segment(fn, args, writes, n, rows, fast, index, filename):
    leaves, spec = args, None
    for a in args:
        if isinstance(a, list | tuple | dict):
            leaves, spec = pytree.tree_flatten(args)
            break
    batched = [isinstance(v, torch.Tensor) for v in leaves]
    if True not in batched:
        return _outputs(fn(*args), writes, lambda t: _repeat(t, n))
    if rows is not None and current_ledger() is not None:
        with active_rows(rows):
            return _run(fn, args, leaves, spec, batched, writes, n, fast, index, filename)
    return _run(fn, args, leaves, spec, batched, writes, n, fast, index, filename)


def _run(fn, args, leaves, spec, batched, writes, n, fast, index, filename):
    inputs = [v for v, b in zip(leaves, batched, strict=True) if b]
    if fast[index]:
        ledger = current_ledger()
        counted = None if ledger is None else \
            {k: dict(v) for k, v in ledger.counter.flop_counts.items()}
        try:
            with rowwise(inputs) as mode:
                local_vars = fn(*args)
            return _outputs(local_vars, writes,
                            lambda t: t if mode.is_batched(t) else _repeat(t, n))
        except NotRowwise:
            fast[index] = False
            if counted is not None:  # forget the work done before the fast path gave up
                ledger.counter.flop_counts.clear()
                ledger.counter.flop_counts.update(
                    {k: defaultdict(int, v) for k, v in counted.items()})
    static: dict[str, Any] = {}

    def one(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(tensors)
        values = [next(it) if b else v for v, b in zip(leaves, batched, strict=True)]
        if spec is not None:
            values = pytree.tree_unflatten(values, spec)
        out_leaves, static["spec"] = pytree.tree_flatten(_keep(fn(*values), writes))
        static["leaves"] = [None if isinstance(v, torch.Tensor) else v for v in out_leaves]
        return tuple(v for v in out_leaves if isinstance(v, torch.Tensor))

    try:
        if n == 0:  # vmap over 0 samples fails in some ops: run one sample of zeros, keep none
            with torch.no_grad():
                tensors = vmap(one, randomness="different")(
                    *(v.new_zeros((1, *v.shape[1:])) for v in inputs))
            tensors = [t[:0] for t in tensors]
        else:
            tensors = vmap(one, randomness="different")(*inputs)
    except RuntimeError as e:
        if not any(m in str(e) for m in _DATA_DEPENDENT):
            raise
        line = _user_line(e, filename)
        raise PerSampleError(
            f"@per_sample: {filename}, line {line}: a per-sample tensor is used as a Python "
            "value (in `and`/`or`/`not`, `x if c else y`, `assert`, bool(), int() or "
            ".item()). Only if/while/for statements are split per sample: write an `if` "
            "statement, or use torch.where(c, x, y) and &, |, ~ on bool tensors.",
            filename=filename, lineno=line) from e
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if v is None else v for v in static["leaves"]],
                                 static["spec"])


def _keep(local_vars: dict[str, Any], writes: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in local_vars.items() if k in writes}


def _outputs(local_vars: dict[str, Any], writes: frozenset[str], fix: Callable) -> dict:
    """The segment's locals, with ``fix`` applied to every tensor."""
    out = {}
    for k, v in _keep(local_vars, writes).items():
        if isinstance(v, torch.Tensor):
            v = fix(v)
        elif isinstance(v, list | tuple | dict):
            v = pytree.tree_map_only(torch.Tensor, fix, v)
        out[k] = v
    return out


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    """A tensor that does not depend on the sample, once per sample."""
    return t.unsqueeze(0).expand(n, *t.shape).clone()


def _user_line(error: BaseException, filename: str) -> int:
    """The deepest line of the user's file in the error's traceback."""
    line, tb = 0, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
