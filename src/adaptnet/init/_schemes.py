"""Initialisation schemes by name: ``"kaiming_uniform(nonlinearity=relu)"`` -> a ``Scheme``.

Every ``torch.nn.init`` scheme is available under its name without the
trailing underscore, with its keyword arguments. Each scheme also knows the
standard deviation it should produce, which :func:`init_report` compares
with what it observes.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adaptnet._tree import suggest
from adaptnet.errors import InitError

__all__ = ["SCHEMES", "Scheme", "parse_scheme"]

_INIT = nn.init


def _fans(t: torch.Tensor) -> tuple[int, int]:
    return nn.init._calculate_fan_in_and_fan_out(t)


def _kaiming_std(t: torch.Tensor, kw: dict) -> float:
    fan_in, fan_out = _fans(t)
    fan = fan_in if kw.get("mode", "fan_in") == "fan_in" else fan_out
    gain = nn.init.calculate_gain(kw.get("nonlinearity", "leaky_relu"), kw.get("a", 0))
    return gain / math.sqrt(fan)


def _xavier_std(t: torch.Tensor, kw: dict) -> float:
    fan_in, fan_out = _fans(t)
    return kw.get("gain", 1.0) * math.sqrt(2.0 / (fan_in + fan_out))


def _orthogonal_std(t: torch.Tensor, kw: dict) -> float:
    rows = t.shape[0]
    cols = t.numel() // rows
    return kw.get("gain", 1.0) * math.sqrt(min(rows, cols) / (rows * cols))


def _trunc_normal_std(t: torch.Tensor, kw: dict) -> float:
    mean, std = kw.get("mean", 0.0), kw.get("std", 1.0)
    lo, hi = (kw.get("a", -2.0) - mean) / std, (kw.get("b", 2.0) - mean) / std
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: (1 + math.erf(z / math.sqrt(2))) / 2  # noqa: E731
    mass = cdf(hi) - cdf(lo)
    var = 1 + (lo * pdf(lo) - hi * pdf(hi)) / mass - ((pdf(lo) - pdf(hi)) / mass) ** 2
    return std * math.sqrt(var)


def _sparse_std(t: torch.Tensor, kw: dict) -> float:
    rows = t.shape[0]
    zeros = math.ceil(kw["sparsity"] * rows)
    return kw.get("std", 0.01) * math.sqrt((rows - zeros) / rows)


def _exact_std(fn: Callable) -> Callable[[torch.Tensor, dict], float]:
    """For deterministic schemes: the std of the scheme applied to a scratch tensor."""
    def std(t: torch.Tensor, kw: dict) -> float:
        scratch = torch.empty(t.shape, dtype=torch.float64)
        fn(scratch, **kw)
        return float(scratch.std()) if scratch.numel() > 1 else 0.0
    return std


_Std = Callable[[torch.Tensor, dict], float]
#: The named schemes: name -> (function, keyword arguments it takes, random?, expected std).
SCHEMES: dict[str, tuple[Callable, tuple[str, ...], bool, _Std]] = {
    "uniform": (_INIT.uniform_, ("a", "b"), True,
                lambda t, kw: (kw.get("b", 1.0) - kw.get("a", 0.0)) / math.sqrt(12)),
    "normal": (_INIT.normal_, ("mean", "std"), True, lambda t, kw: kw.get("std", 1.0)),
    "constant": (_INIT.constant_, ("val",), False, lambda t, kw: 0.0),
    "zeros": (_INIT.zeros_, (), False, lambda t, kw: 0.0),
    "ones": (_INIT.ones_, (), False, lambda t, kw: 0.0),
    "xavier_uniform": (_INIT.xavier_uniform_, ("gain",), True, _xavier_std),
    "xavier_normal": (_INIT.xavier_normal_, ("gain",), True, _xavier_std),
    "kaiming_uniform": (_INIT.kaiming_uniform_, ("a", "mode", "nonlinearity"), True,
                        _kaiming_std),
    "kaiming_normal": (_INIT.kaiming_normal_, ("a", "mode", "nonlinearity"), True, _kaiming_std),
    "orthogonal": (_INIT.orthogonal_, ("gain",), True, _orthogonal_std),
    "trunc_normal": (_INIT.trunc_normal_, ("mean", "std", "a", "b"), True, _trunc_normal_std),
    "eye": (_INIT.eye_, (), False, _exact_std(_INIT.eye_)),
    "dirac": (_INIT.dirac_, ("groups",), False, _exact_std(_INIT.dirac_)),
    "sparse": (_INIT.sparse_, ("sparsity", "std"), True, _sparse_std),
}
_REQUIRED = {"constant": ("val",), "sparse": ("sparsity",)}
_DIMS = {"eye": (2,), "sparse": (2,), "dirac": (3, 4, 5)}


@dataclass(frozen=True)
class Scheme:
    """A named ``torch.nn.init`` scheme with its keyword arguments."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name

    def apply(self, t: torch.Tensor, generator: torch.Generator | None) -> None:
        fn, _, random, _ = SCHEMES[self.name]
        with torch.no_grad():
            if random:
                fn(t, **self.kwargs, generator=generator)
            else:
                fn(t, **self.kwargs)

    def expected_std(self, t: torch.Tensor) -> float:
        return SCHEMES[self.name][3](t, dict(self.kwargs))

    def check(self, t: torch.Tensor, path: str) -> None:
        """Refuse a tensor the scheme cannot initialise, before anything is written."""
        dims = _DIMS.get(self.name)
        needs_fans = self.name.startswith(("xavier", "kaiming")) or self.name == "orthogonal"
        if (dims and t.dim() not in dims) or (needs_fans and t.dim() < 2):
            want = f"{' or '.join(map(str, dims))}-D" if dims else "at least 2-D"
            raise InitError(f"initialize(): {self} needs a {want} tensor, but {path} has shape "
                            f"{tuple(t.shape)}; give it another scheme (e.g. '*.bias': "
                            "'zeros').")


def parse_scheme(spec: str | Scheme | Mapping[str, Any], where: str = "") -> Scheme:
    """``"normal(std=0.02)"``, ``"zeros"`` or ``{"name": "normal", "std": 0.02}`` -> Scheme.

    Bare words are strings (``nonlinearity=relu`` is ``nonlinearity='relu'``).

    Example:
        >>> import adaptnet.init
        >>> from adaptnet.init import parse_scheme
        >>> scheme = parse_scheme("kaiming_uniform(a=0.1)")
        >>> isinstance(scheme, adaptnet.init.Scheme), scheme.name
        (True, 'kaiming_uniform')
    """
    if isinstance(spec, Scheme):
        return spec
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        return _checked(name, kwargs, spec, where)
    if not isinstance(spec, str):
        raise InitError(f"initialize(): {where}scheme must be a string like "
                        f"'normal(std=0.02)', got {type(spec).__name__}.")
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        node = None  # also a lone surrogate (UnicodeEncodeError) or a thousand nested signs
    if isinstance(node, ast.Name):
        return _checked(node.id, {}, spec, where)
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise InitError(f"initialize(): {where}cannot read scheme {spec!r}; write a name with "
                        "keyword arguments, e.g. 'kaiming_uniform(nonlinearity=relu)' or 'zeros'.")
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise InitError(f"initialize(): {where}scheme {spec!r}: ** is not allowed.")
        kwargs[kw.arg] = kw.value.id if isinstance(kw.value, ast.Name) else \
            _literal(kw.arg, kw.value, spec, where)
    return _checked(node.func.id, kwargs, spec, where)


def _literal(key: str, node: ast.expr, spec: str, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, RecursionError):  # RecursionError: a thousand nested signs
        raise InitError(f"initialize(): {where}scheme {spec!r}: {key}= is not a number, string "
                        "or bool.") from None


def _checked(name: Any, kwargs: dict, spec: Any, where: str) -> Scheme:
    if name not in SCHEMES:
        raise InitError(f"initialize(): {where}unknown scheme {name!r} in {spec!r}. "
                        + suggest(str(name), list(SCHEMES), "schemes"))
    allowed = SCHEMES[name][1]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        takes = ", ".join(allowed) or "no arguments"
        raise InitError(f"initialize(): {where}{name} takes {takes}, got {', '.join(unknown)} "
                        f"in {spec!r}.")
    missing = [k for k in _REQUIRED.get(name, ()) if k not in kwargs]
    if missing:
        raise InitError(f"initialize(): {where}{name} needs {', '.join(missing)}, e.g. "
                        f"'{name}({missing[0]}=0.1)'.")
    problems = _argument_problems(name, kwargs)
    if problems:
        raise InitError(f"initialize(): {where}{spec!r}: {'; '.join(problems)}.")
    return Scheme(name, kwargs)


_NONNEGATIVE = {"std": "a standard deviation", "sparsity": "a fraction"}


def _argument_problems(name: str, kw: dict[str, Any]) -> list[str]:
    """Why the arguments would fail or misbehave when applied (checked before any write)."""
    out = []
    for key, v in kw.items():
        if key in ("mode", "nonlinearity"):
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            out.append(f"{key} must be a number, got {v!r}")
        elif not math.isfinite(v):
            out.append(f"{key} must be finite, got {v!r}")
        elif key in _NONNEGATIVE and v < 0:
            out.append(f"{key} is {_NONNEGATIVE[key]} and must be >= 0, got {v!r}")
    if out:
        return out
    if name == "trunc_normal" and kw.get("std", 1.0) == 0:
        out.append("std must be > 0")
    low, high = (0.0, 1.0) if name == "uniform" else (-2.0, 2.0)
    if name in ("uniform", "trunc_normal") and kw.get("a", low) > kw.get("b", high):
        out.append(f"a must not exceed b, got a={kw.get('a', low)!r}, b={kw.get('b', high)!r}")
    if name == "sparse" and kw["sparsity"] > 1:
        out.append(f"sparsity is a fraction in [0, 1], got {kw['sparsity']!r}")
    if name == "dirac" and (not isinstance(kw.get("groups", 1), int) or kw.get("groups", 1) < 1):
        out.append(f"groups must be a positive int, got {kw['groups']!r}")
    if "mode" in kw and kw["mode"] not in ("fan_in", "fan_out"):
        out.append(f"mode must be 'fan_in' or 'fan_out', got {kw['mode']!r}")
    if "nonlinearity" in kw:
        try:
            nn.init.calculate_gain(kw["nonlinearity"], kw.get("a", 0))
        except (ValueError, TypeError):
            out.append(f"unknown nonlinearity {kw['nonlinearity']!r} (torch.nn.init."
                       "calculate_gain knows relu, leaky_relu, tanh, sigmoid, linear, ...)")
    return out
