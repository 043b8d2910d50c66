"""The row-wise fast path: run a segment on batched tensors without ``vmap``.

Most layer code already treats the leading dimension as independent rows:
``F.linear``, activations, convolutions on a ``(C, H, W)`` sample, elementwise
arithmetic. For those, calling the operation on the batch gives exactly the
per-sample results, minus ``vmap``'s dispatch cost (on CPU, PyTorch 2.13 runs
``linear`` under ``vmap`` several times slower than plainly).

:func:`rowwise` runs the segment inside a ``TorchFunctionMode`` that sees
every operation before it runs. It tracks which tensors are batched (the
segment's inputs and what is computed from them) and lets an operation on a
batched tensor through only if it is in the table below and its arguments
keep rows apart; where the per-sample call has a ``dim``, the batched call
gets ``dim + 1`` (and ``x.sum()`` sums over every dimension but the first;
``x.shape`` reports the per-sample shape). Anything else raises
:class:`NotRowwise` *before* it executes: in-place operations, ``x.T``,
``.item()``, an unbatched operand that would broadcast over the batch
dimension, any operation not listed. The caller then re-runs the segment under
``vmap``; nothing it did had side effects on tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["NotRowwise", "rowwise"]


class NotRowwise(BaseException):
    """The segment did something the fast path cannot batch; run it under vmap."""  # user's
    # ``except Exception`` inside the segment cannot swallow it.


class _Mode(TorchFunctionMode):
    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.ids = {id(t) for t in inputs}
        self.alive = list(inputs)  # keeps ids unique while the segment runs

    def is_batched(self, t: torch.Tensor) -> bool:
        return id(t) in self.ids

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        entry = _ENTRIES.get(func)
        if entry is None:
            entry = _ENTRIES[func] = _entry(func)
        name, rule, mutates = entry
        if mutates or kwargs.get("inplace") or kwargs.get("out") is not None:
            raise NotRowwise(name)
        ids = self.ids
        batched, others = [], []
        for a in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(a, torch.Tensor):
                (batched if id(a) in ids else others).append(a)
            elif isinstance(a, list | tuple):
                for t in a:
                    if isinstance(t, torch.Tensor):
                        (batched if id(t) in ids else others).append(t)
        if not batched:  # nothing per-sample involved: the same for every sample...
            if name in _RANDOM:  # ...unless it draws random numbers: one draw per sample
                raise NotRowwise(name)
            return func(*args, **kwargs)
        if rule is None:
            raise NotRowwise(name)
        out = rule(func, args, kwargs, batched, others)
        if isinstance(out, torch.Tensor):
            ids.add(id(out))
            self.alive.append(out)
        elif isinstance(out, tuple):
            for t in out:
                if isinstance(t, torch.Tensor):
                    ids.add(id(t))
                    self.alive.append(t)
        return out


_ENTRIES: dict[Callable, tuple[str, Callable | None, bool]] = {}


def _entry(func: Callable) -> tuple[str, Callable | None, bool]:
    """An operation's name, rule, and whether it writes in place (cached per function)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property such as ``x.shape``
        name = "." + getattr(getattr(func, "__self__", None), "__name__", "")
    mutates = name in _MUTATING or (name.endswith("_") and not name.startswith("__"))
    return name, _RULES.get(name), mutates


@contextmanager
def rowwise(inputs: list[torch.Tensor]) -> Iterator[_Mode]:
    """Treat ``inputs`` as batched (rows are samples) inside the block."""
    with _Mode(inputs) as mode:
        yield mode


def _abort(why: str) -> NotRowwise:
    return NotRowwise(why)


# -- rules: (func, args, kwargs, batched tensors, unbatched tensors) -> output --------------

def _elementwise(func, args, kwargs, batched, others):
    rank = batched[0].dim()
    if rank == 0 or any(t.dim() != rank for t in batched) or \
            any(t.dim() >= rank for t in others):
        raise _abort("broadcast")  # an unbatched operand would align with the batch dim
    return func(*args, **kwargs)


def _where(func, args, kwargs, batched, others):
    if len(args) + len(kwargs) == 1:
        raise _abort("where(cond)")  # the indices of nonzero elements: not row-wise
    return _elementwise(func, args, kwargs, batched, others)


def _shift(dim: Any, rank: int) -> Any:
    """A per-sample dim (rank ``rank``) as the same dim of the batched tensor."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        if not -rank <= dim < rank:
            raise _abort("dim")
        return dim + 1 if dim >= 0 else dim
    if isinstance(dim, list | tuple) and dim:
        return tuple(_shift(d, rank) for d in dim)
    raise _abort("dim")


def _dim_op(pos: int, default: Any = None, full: Callable | None = None) -> Callable:
    """An operation with a ``dim`` at position ``pos`` (or keyword); ``default`` if absent.

    With no dim and no default, ``full(x, dims, args, kwargs)`` reduces every
    per-sample dimension, or the fast path gives up.
    """
    def rule(func, args, kwargs, batched, others):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or len(batched) != 1 or others or x.dim() < 2:
            return _elementwise_or_abort(func, args, kwargs, batched, others)
        rank = x.dim() - 1
        args, kwargs = list(args), dict(kwargs)
        dim = args[pos] if len(args) > pos else kwargs.get("dim", default)
        if dim is None:
            if full is None:
                raise _abort("no dim")
            return full(func, x, tuple(range(1, x.dim())), args, kwargs)
        if len(args) > pos:
            args[pos] = _shift(dim, rank)
        else:
            kwargs["dim"] = _shift(dim, rank)
        return func(*args, **kwargs)
    return rule


def _elementwise_or_abort(func, args, kwargs, batched, others):
    if getattr(func, "__name__", "") in ("max", "min") and len(args) > 1 and \
            isinstance(args[1], torch.Tensor):
        return _elementwise(func, args, kwargs, batched, others)
    raise _abort("operands")


def _reduce_all(func, x, dims, args, kwargs):
    if len(args) > 1:
        raise _abort("positional")
    name = func.__name__
    if name in ("max", "min"):
        return (torch.amax if name == "max" else torch.amin)(x, dim=dims)
    if name == "prod":
        if len(dims) != 1:
            raise _abort("prod over several dims")
        dims = dims[0]
    return func(x, dim=dims, **{k: v for k, v in kwargs.items() if k != "dim"})


def _norm_all(func, x, dims, args, kwargs):
    p = args[1] if len(args) > 1 else kwargs.get("p", kwargs.get("ord", "fro"))
    if p in ("fro", None):
        p = 2
    if not isinstance(p, int | float) or len(args) > 2:
        raise _abort("norm")
    return torch.linalg.vector_norm(x, p, dim=dims, keepdim=kwargs.get("keepdim", False),
                                    dtype=kwargs.get("dtype"))


def _shape_of(func, args, kwargs, batched, others):
    x = args[0]
    if x.dim() == 0 or others:
        raise _abort("shape")
    name = func.__name__
    rank = x.dim() - 1
    rest = args[1] if len(args) == 2 and isinstance(args[1], list | tuple | torch.Size) \
        else args[1:]
    if name in ("reshape", "view"):
        if not rest or not all(isinstance(s, int) for s in rest) or kwargs:
            raise _abort("view")
        return func(x, (x.shape[0], *rest))
    if name == "permute":
        return x.permute(0, *(_shift(d, rank) for d in rest))
    if name == "t":
        return x if rank < 2 else x.transpose(1, 2)
    if name == "squeeze" and not rest and "dim" not in kwargs:
        dims = tuple(i for i in range(1, x.dim()) if x.shape[i] == 1)
        return x.squeeze(dims) if dims else x
    if name == "size":
        d = rest[0] if rest else kwargs.get("dim")
        return x.shape[1:] if d is None else x.size(_shift(d, rank))
    if name == "dim":
        return rank
    raise _abort(name)


def _transpose(func, args, kwargs, batched, others):
    x = args[0]
    if len(args) != 3 or kwargs or others or x.dim() < 2:
        raise _abort("transpose")
    return func(x, _shift(args[1], x.dim() - 1), _shift(args[2], x.dim() - 1))


def _squeeze(func, args, kwargs, batched, others):
    if len(args) > 1 or "dim" in kwargs:
        return _dim_op(1)(func, args, kwargs, batched, others)
    return _shape_of(func, args, kwargs, batched, others)


def _unsqueeze(func, args, kwargs, batched, others):
    x, d = args[0], args[1] if len(args) > 1 else kwargs["dim"]
    if not isinstance(d, int) or not -(x.dim()) <= d < x.dim():
        raise _abort("unsqueeze")
    return x.unsqueeze(d + 1 if d >= 0 else d)


def _flatten(func, args, kwargs, batched, others):
    x = args[0]
    rank = x.dim() - 1
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    if rank == 0:
        return x.unsqueeze(1)  # flattening a per-sample scalar gives shape (1,)
    return x.flatten(_shift(start, rank), _shift(end, rank))


def _join(func, args, kwargs, batched, others):
    seq = args[0]
    if others or not isinstance(seq, list | tuple) or \
            any(not isinstance(t, torch.Tensor) for t in seq):
        raise _abort("join")
    rank = seq[0].dim() - 1
    if any(t.dim() != rank + 1 for t in seq):
        raise _abort("join ranks")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if func.__name__ == "stack":  # a new dim: -(rank+1) <= dim <= rank
        if not isinstance(dim, int) or not -(rank + 1) <= dim <= rank:
            raise _abort("stack dim")
        return torch.stack(seq, dim + 1 if dim >= 0 else dim)
    return torch.cat(seq, _shift(dim, rank))


def _getitem(func, args, kwargs, batched, others):
    x, index = args
    if not isinstance(index, tuple):
        index = (index,)
    if x.dim() == 0 or any(not (type(i) is int or i is None or i is Ellipsis or
                                (isinstance(i, slice) and all(type(b) is int or b is None for b
                                                             in (i.start, i.stop, i.step))))
                           for i in index):
        raise _abort("index")
    return x[(slice(None), *index)]


def _linear(func, args, kwargs, batched, others):
    if args[0] is not batched[0] or len(batched) != 1 or args[0].dim() < 2:
        raise _abort("linear")
    return func(*args, **kwargs)


def _matmul(func, args, kwargs, batched, others):
    a, b = args[0], args[1]
    a_in, b_in = any(t is a for t in batched), any(t is b for t in batched)
    if a_in and not b_in and a.dim() >= 2 and b.dim() <= 2:
        return func(a, b)
    if a_in and b_in and a.dim() == b.dim() >= 3:
        return func(a, b)
    raise _abort("matmul")


def _spatial(n: int) -> Callable:
    """Convolutions and pools over ``n`` spatial dims: a sample is ``(C, *spatial)``."""
    def rule(func, args, kwargs, batched, others):
        if args[0] is not batched[0] or len(batched) != 1 or args[0].dim() != n + 2:
            raise _abort("spatial")
        return func(*args, **kwargs)
    return rule


def _same(func, args, kwargs, batched, others):
    """Operations whose extra tensors (weights, ids) never mix rows: layer_norm, embedding."""
    if len(batched) != 1 or batched[0].dim() < 2:
        raise _abort("same")
    name = func.__name__
    if name == "embedding" and args[0] is not batched[0]:
        raise _abort("embedding weights")
    if name == "layer_norm" and args[0] is not batched[0]:
        raise _abort("layer_norm weights")
    return func(*args, **kwargs)


def _prop(func, args, kwargs, batched, others):
    name = func.__self__.__name__
    x = args[0]
    if name == "shape":
        return x.shape[1:]
    if name == "ndim":
        return x.dim() - 1
    return func(*args, **kwargs)


def _prop_call(func, args, kwargs, batched, others):
    """Introspection that does not see rows (``count_macs`` hooks its outputs)."""
    return func(*args, **kwargs)


_RANDOM = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial",
           "poisson", "rand_like", "randn_like", "randint_like", "dropout", "alpha_dropout",
           "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}

_MUTATING = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
             "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__imatmul__",
             "__ilshift__", "__irshift__", "set_", "resize_"}

_ELEMENTWISE = (
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "elu", "selu", "celu",
    "leaky_relu", "softplus", "softsign", "mish", "hardswish", "hardsigmoid", "logsigmoid",
    "tanhshrink", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt",
    "abs", "neg", "negative", "sign", "sgn", "square", "reciprocal", "sin", "cos", "tan",
    "asin", "acos", "atan", "sinh", "cosh", "erf", "erfc", "floor", "ceil", "round", "trunc",
    "frac", "clamp", "clip", "clamp_min", "clamp_max", "logical_not", "bitwise_not", "isnan",
    "isinf", "isfinite", "nan_to_num", "clone", "contiguous", "detach", "float", "double",
    "half", "bfloat16", "long", "int", "bool", "to", "type_as", "dropout", "zeros_like",
    "ones_like", "full_like", "rand_like", "randn_like", "empty_like", "add", "sub",
    "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide", "remainder",
    "fmod", "pow", "float_power", "atan2", "maximum", "minimum", "fmax", "fmin", "eq", "ne",
    "lt", "le", "gt", "ge", "greater", "less", "greater_equal", "less_equal", "logical_and",
    "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "where", "lerp",
    "addcmul", "addcdiv", "copysign", "hypot", "xlogy", "rsub", "__add__", "__radd__",
    "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__and__",
    "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__eq__", "__ne__", "__lt__",
    "__le__", "__gt__", "__ge__", "__neg__", "__pos__", "__abs__", "__invert__",
)

_RULES: dict[str, Callable] = dict.fromkeys(_ELEMENTWISE, _elementwise) | {"where": _where}
_RULES |= dict.fromkeys(["sum", "mean", "nansum", "nanmean", "amax", "amin", "all", "any",
                         "count_nonzero", "prod", "max", "min"], _dim_op(1, full=_reduce_all))
_RULES |= dict.fromkeys(["softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp",
                         "argmax", "argmin", "logsumexp"], _dim_op(1))
_RULES |= dict.fromkeys(["transpose", "swapaxes", "swapdims"], _transpose)
_RULES |= {"norm": _dim_op(2, full=_norm_all),
           "linalg_vector_norm": _dim_op(2, full=_norm_all),
           "chunk": _dim_op(2, default=0), "split": _dim_op(2, default=0),
           "unbind": _dim_op(1, default=0), "squeeze": _squeeze}
_RULES |= dict.fromkeys(["reshape", "view", "permute", "t", "size", "dim"], _shape_of)
_RULES |= {"unsqueeze": _unsqueeze, "flatten": _flatten, "cat": _join, "concat": _join,
           "concatenate": _join, "stack": _join, "__getitem__": _getitem, "linear": _linear,
           "matmul": _matmul, "__matmul__": _matmul, "layer_norm": _same, "embedding": _same,
           ".shape": _prop, ".ndim": _prop, ".dtype": _prop, ".device": _prop,
           ".requires_grad": _prop, ".is_cuda": _prop, ".layout": _prop, ".grad_fn": _prop,
           ".is_leaf": _prop, "register_hook": _prop_call}
for _n, _names in ((1, "conv1d max_pool1d avg_pool1d adaptive_avg_pool1d adaptive_max_pool1d"),
                   (2, "conv2d max_pool2d avg_pool2d adaptive_avg_pool2d adaptive_max_pool2d"),
                   (3, "conv3d max_pool3d avg_pool3d adaptive_avg_pool3d adaptive_max_pool3d")):
    _RULES |= dict.fromkeys(_names.split(), _spatial(_n))
