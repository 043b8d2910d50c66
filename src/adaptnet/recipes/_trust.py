"""Code a recipe names: refused unless trusted, imported only when it is.

Recipes and run directories are data: reading one runs no code. A model
that names ``builder: "package.module:function"`` imports that module only
inside :func:`trusting` for it, which the entry points enter when the user
opts in (``trust_code=True``, ``--trust-code``, as transformers'
``trust_remote_code``), for exactly the modules the recipe (and its transfer
backbone) names. A standard-library or builtin callable is never a builder.
The current directory is searched first, as ``python -m`` does; then
``sys.path``. (Apart from the recipe schema and the model building, which
both use it, so that neither imports the other.)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from adaptnet._io import short, shown
from adaptnet.errors import RecipeError

__all__ = ["check_builder_path", "import_builder", "module_of", "refuse_code", "trusted",
           "trusting"]

# The modules the current call may import: set only by `trusting`, per call (a ContextVar,
# so that threads and nested calls each see their own).
_TRUSTED: ContextVar[frozenset[str]] = ContextVar("adaptnet_trusted_code", default=frozenset())


def module_of(path: str) -> str:
    """The module a builder path (``"module:function"``) names."""
    return path.partition(":")[0]


@contextlib.contextmanager
def trusting(paths: Iterable[str]) -> Iterator[None]:
    """Let the builders ``paths`` (``"module:function"``) import their modules in this block."""
    token = _TRUSTED.set(_TRUSTED.get() | {module_of(p) for p in paths})
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def trusted(path: str) -> bool:
    """Whether builder ``path``'s module may be imported now."""
    return module_of(path) in _TRUSTED.get()


def refuse_code(paths: list[str]) -> None:
    """The error for code a recipe or run would run without the user's opt-in."""
    modules = ", ".join(dict.fromkeys(repr(module_of(p)) for p in paths))
    raise RecipeError(
        f"this recipe's model.builder runs code: it would import {modules}. Recipes and run "
        "directories are data, and adaptnet runs no code from them unless asked: if you "
        "trust that code, pass --trust-code (trust_code=True from Python).")


def check_builder_path(path: str) -> None:
    """Refuse a builder path that is malformed or names the standard library (no import).

    Raises:
        RecipeError: naming the path and what a builder looks like.
    """
    module, colon, attr = path.partition(":")
    names = [*module.split("."), *attr.split(".")]
    if not colon or not all(n.isidentifier() for n in names):
        raise RecipeError(f"model.builder {shown(path)} must look like "
                          "'package.module:function', e.g. 'mymodels:build_net'.")
    if names[0] in sys.stdlib_module_names:
        raise RecipeError(f"model.builder {path!r} is in Python's standard library "
                          f"({names[0]!r}); a builder is a function of your own that returns "
                          "an nn.Module, e.g. 'mymodels:build_net'.")


def import_builder(path: str) -> Callable[..., Any]:
    """The function ``"package.module:function"`` names, its module imported (trusted only).

    Raises:
        RecipeError: a malformed path, a standard-library or builtin module, a
            module the user has not trusted (naming it and the opt-in), a module
            that cannot be imported (with the exception it raised), or no such
            callable in it.
    """
    check_builder_path(path)
    module, _, attr = path.partition(":")
    if not trusted(path):
        refuse_code([path])
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # the user's module: any error may surface while importing it
        raise RecipeError(
            f"model.builder {path!r}: cannot import {module!r} ({type(e).__name__}: "
            f"{short(str(e), 200)}). It must be importable: a module in the current "
            "directory, on PYTHONPATH, or installed.") from None
    finally:
        if added:
            sys.path.remove(here)
    try:
        fn = functools.reduce(getattr, attr.split("."), mod)
    except AttributeError:
        public = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise RecipeError(f"model.builder {path!r}: {module} has no {attr!r}; its callables: "
                          f"{', '.join(public[:12]) or 'none'}.") from None
    if not callable(fn):
        raise RecipeError(f"model.builder {path!r} is a {type(fn).__name__}, not a function.")
    return fn
