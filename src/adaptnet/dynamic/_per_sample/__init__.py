"""``@per_sample``: write the forward for one example with Python control flow, run it batched.

How it works (see docs/dynamic.md): the function's source is parsed once, when
it is decorated (``_lower.py``); straight-line code becomes segments that run
on all samples of a frame at once (``_batched.py``, ``_rowwise.py``), and each
``if``/``while``/``for``/``return`` partitions the samples so each runs only its
own path (``_run.py``).
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree

from adaptnet.dynamic._guards import refuse_tracing
from adaptnet.dynamic._per_sample._batched import INSIDE
from adaptnet.dynamic._per_sample._lower import lower
from adaptnet.dynamic._per_sample._run import execute
from adaptnet.errors import DynamicError, PerSampleError

__all__ = ["per_sample"]

F = TypeVar("F", bound=Callable[..., Any])


def per_sample(fn: F | None = None, /, *, max_iters: int = 1000) -> F | Callable[[F], F]:
    """Write ``fn`` for ONE example; call it on a batch.

    Inside ``fn`` every tensor argument is one example (no batch dimension, as
    under ``torch.func.vmap``), so ``if x.sum() > 0:`` decides per example. The
    decorated function takes tensors with a leading batch dimension ``B`` (every
    tensor argument, also inside tuples/lists/dicts, is split along it; other
    arguments are passed whole) and returns batched tensors. Each ``if``,
    ``while`` and ``for`` whose test is a per-example tensor partitions the
    batch, so every example runs only the statements it reaches, with
    autograd; tests on plain Python values stay plain Python.

    Supported: ``if``/``elif``/``else``; ``while``; ``for`` over ``range``,
    lists, modules or a tensor's first per-example dimension; ``break``,
    ``continue`` and ``return`` anywhere in them; calls to modules and
    functions; ``with``/``try`` around straight-line code. A Python number that
    differs between paths (a step counter) becomes a per-example tensor.

    Args:
        fn: a function, a ``forward`` method or a bound method, defined in a file
            or notebook (its source is read when it is decorated); or a lambda,
            which has no statements to rewrite and runs like ``vmap``.
        max_iters: the most iterations a ``while`` loop may run; more is an error.

    Returns:
        The batched function.

    Raises:
        PerSampleError: when decorating: no source, or unsupported code
            (``yield``, ``global``, assignment to an attribute, control flow
            inside ``with``/``try``, loop ``else``), with the file and line and
            the rewrite. When called: a per-example tensor used as a Python bool
            (``and``/``or``, ``x if c else y``), paths that leave a variable with
            different shapes, a ``while`` loop past ``max_iters``.
        DynamicError: bad ``max_iters``, or tensor arguments without a common
            batch dimension.

    Example:
        The textbook network, run on a batch (see README for the module version):

        >>> import torch, adaptnet
        >>> @adaptnet.per_sample
        ... def f(x):
        ...     if x.sum() > 0:
        ...         return x * 10
        ...     return -x
        >>> f(torch.tensor([[1.0, 2.0], [-3.0, 1.0]]))
        tensor([[10., 20.],
                [ 3., -1.]])
    """
    if fn is None:
        return functools.partial(per_sample, max_iters=max_iters)
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise DynamicError(f"per_sample(): max_iters must be a positive int, got "
                           f"{max_iters!r}; it bounds every while loop, e.g. max_iters=100.")
    if inspect.ismethod(fn):  # a bound method: batch its function, keep the instance
        return types.MethodType(per_sample(fn.__func__, max_iters=max_iters), fn.__self__)
    if not inspect.isfunction(fn):
        raise PerSampleError(f"per_sample(): expected a function or a forward method, got "
                             f"{type(fn).__name__}; decorate the `def` itself.")
    program = lower(fn)
    signature = inspect.signature(fn)
    fast = [True] * program.n_segs  # per segment: may it try the row-wise fast path?

    params = signature.parameters.values()
    simple = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    if len(simple) != len(params):
        simple = []  # *args, keyword-only...: always bind through the signature

    @functools.wraps(fn)
    def batched(*args: Any, **kwargs: Any) -> Any:
        refuse_tracing(f"@per_sample {fn.__qualname__}()")
        if INSIDE.get():
            raise PerSampleError(
                f"@per_sample: {fn.__qualname__}() was called from inside another @per_sample "
                "function, where its arguments are single examples. Call the undecorated "
                f"function ({fn.__qualname__}.per_example) on the example, and move its "
                "if/while/for into the outer function.", filename=program.filename,
                lineno=fn.__code__.co_firstlineno)
        if not kwargs and simple and len(args) == len(simple):
            env = dict(zip(simple, args, strict=True))  # the common call, without inspect
        else:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            env = dict(bound.arguments)
        return execute(program, env, _batch_size(fn, env), max_iters, fast)

    # No __wrapped__: torch.jit.script would compile the undecorated per-example source and
    # decide once per batch. Without it, scripting stops at `call(*args, **kwargs)` below
    # with torch's NotSupportedError, which quotes the comment on that line.
    del batched.__wrapped__
    batched.__signature__ = signature
    batched.per_example = fn
    return eager_under_compile(batched)


def eager_under_compile(fn: F) -> F:
    """``torch.compiler.disable(fn)``, applied at the first call under a loaded ``torch._dynamo``.

    Decorating with ``torch.compiler.disable`` imports ``torch._dynamo`` (about 1.4
    CPU-seconds) when the decorator runs, so importing the zoo would pay for it.
    ``torch.compile`` imports dynamo before it traces anything, so a call made while
    dynamo is absent is never compiled, and one made after it goes through the
    disabled function: dynamo graph-breaks there and runs ``fn`` eagerly.
    """
    disabled: Callable | None = None

    @functools.wraps(fn, assigned=(*functools.WRAPPER_ASSIGNMENTS, "__signature__"))
    def call(*args: Any, **kwargs: Any) -> Any:  # adaptnet: no TorchScript; eager or compile
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    del call.__wrapped__
    return call  # type: ignore[return-value]


def _batch_size(fn: Callable, env: dict[str, Any]) -> int:
    sizes = {}
    for name, value in env.items():
        leaves = [value] if isinstance(value, torch.Tensor) else pytree.tree_leaves(value)
        for t in leaves:
            if not isinstance(t, torch.Tensor):
                continue
            if t.dim() == 0:
                raise DynamicError(
                    f"{fn.__qualname__}(): argument `{name}` is a 0-d tensor, but @per_sample "
                    "splits every tensor argument along its first (batch) dimension. Give it "
                    "one row per sample, or pass a Python number.")
            sizes.setdefault(t.shape[0], name)
    if not sizes:
        raise DynamicError(f"{fn.__qualname__}(): got no tensor argument to split into "
                           "samples; pass tensors with a leading batch dimension.")
    if len(sizes) > 1:
        raise DynamicError(
            f"{fn.__qualname__}(): tensor arguments disagree in batch size "
            f"({', '.join(f'`{n}` has {b}' for b, n in sizes.items())}); every tensor "
            "argument is split along its first dimension. Close over tensors shared by the "
            "batch (weights) instead of passing them.")
    return next(iter(sizes))
