"""A recipe's model: the zoo's builder or the user's own, then its ``ties:`` and ``share:``.

Recipes and run directories are data: reading one runs no code. A model
that names ``builder: "package.module:function"`` imports that module only
inside :func:`trusting` for it, which the entry points enter when the user
opts in (``trust_code=True``, ``--trust-code``, as transformers'
``trust_remote_code``), for exactly the modules the recipe (and its transfer
backbone) names. A standard-library or builtin callable is never a builder.
The current directory is searched first, as ``python -m`` does; then
``sys.path``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from torch import nn

from adaptnet import _rundir
from adaptnet._io import short, shown
from adaptnet.errors import AdaptnetError, RecipeError, RunDirError
from adaptnet.models import MODELS, build
from adaptnet.recipes._hf import RECIPE_MODELS
from adaptnet.recipes._schema import ModelSpec, Recipe, check_args
from adaptnet.sharing import share, tie

__all__ = ["apply_sharing", "build_model", "builder_of", "check_builder_path", "code_notices",
           "code_of", "import_builder", "trusted", "trusting"]

# The modules the current call may import: set only by `trusting`, per call (a ContextVar,
# so that threads and nested calls each see their own).
_TRUSTED: ContextVar[frozenset[str]] = ContextVar("adaptnet_trusted_code", default=frozenset())


def _module(path: str) -> str:
    return path.partition(":")[0]


@contextlib.contextmanager
def trusting(paths: Iterable[str]) -> Iterator[None]:
    """Let the builders ``paths`` (``"module:function"``) import their modules in this block."""
    token = _TRUSTED.set(_TRUSTED.get() | {_module(p) for p in paths})
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def trusted(path: str) -> bool:
    """Whether builder ``path``'s module may be imported now."""
    return _module(path) in _TRUSTED.get()


def code_of(recipe: Recipe, seen: frozenset[str] = frozenset()) -> list[str]:
    """The ``model.builder`` paths running ``recipe`` imports, its transfer backbone's (a
    recipe or a run directory, followed down its chain) included; read, never imported."""
    paths = [] if recipe.model.builder is None else [recipe.model.builder]
    backbone = None if recipe.transfer is None else recipe.transfer.backbone
    if backbone is None or backbone in seen:
        return paths
    if Path(backbone).is_dir():
        try:
            model = _rundir.read_config(backbone).model
        except RunDirError:  # reported where the backbone is loaded
            return paths
        builder = model.get("builder")
        return paths + ([builder] if isinstance(builder, str) else [])
    from adaptnet.recipes._lookup import load_recipe  # the recipe module reads this one's

    try:
        inner = load_recipe(backbone)[1]
    except RecipeError:  # reported where the backbone is loaded
        return paths
    return paths + code_of(inner, seen | {backbone})


def refuse_code(paths: list[str]) -> None:
    """The error for code a recipe or run would run without the user's opt-in."""
    modules = ", ".join(dict.fromkeys(repr(_module(p)) for p in paths))
    raise RecipeError(
        f"this recipe's model.builder runs code: it would import {modules}. Recipes and run "
        "directories are data, and adaptnet runs no code from them unless asked: if you "
        "trust that code, pass --trust-code (trust_code=True from Python).")


def code_notices(recipe: Recipe, trust_code: bool) -> list[str]:
    """What to tell the user before running ``recipe``: ``"module (where it is)"`` for each
    module its builders import, found without importing anything.

    Raises:
        RecipeError: the recipe names code and ``trust_code`` is False (naming
            the modules and the opt-in).
    """
    paths = code_of(recipe)
    if paths and not trust_code:
        refuse_code(paths)
    notices = []
    for module in dict.fromkeys(_module(p) for p in paths):
        top = module.split(".")[0]
        spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path])
        where = spec.origin if spec is not None and spec.origin else "not found"
        notices.append(f"{module} ({where})")
    return notices


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


def builder_of(spec: ModelSpec) -> Callable[..., Any]:
    """The zoo builder ``spec.name`` (or a recipes one: ``hf_causal_lm``) or the user's
    ``spec.builder`` (imported)."""
    if spec.name in RECIPE_MODELS:
        return RECIPE_MODELS[spec.name]
    return MODELS[spec.name] if spec.name is not None else import_builder(str(spec.builder))


def build_model(spec: ModelSpec, args: dict[str, Any]) -> nn.Module:
    """The model ``spec`` names, built with ``args``."""
    if spec.name in RECIPE_MODELS:
        return RECIPE_MODELS[spec.name](**args)
    if spec.name is not None:
        return build(spec.name, **args)
    fn = import_builder(str(spec.builder))
    problems = check_args("model", fn, args)  # what validation could not check untrusted
    if problems:
        raise RecipeError("; ".join(problems))
    try:
        model = fn(**args)
    except AdaptnetError:
        raise
    except Exception as e:  # the user's code
        raise RecipeError(f"model.builder {spec.builder!r} with {shown(args)} raised "
                          f"{type(e).__name__}: {short(str(e), 300)}") from None
    if not isinstance(model, nn.Module):
        raise RecipeError(f"model.builder {spec.builder!r} returned a {type(model).__name__}; "
                          "it must return an nn.Module.")
    return model


def apply_sharing(model: nn.Module, recipe: Recipe) -> None:
    """Apply the recipe's ``ties:`` then its ``share:`` entries to ``model``."""
    for member, target in recipe.ties.items():
        owner, transform = (target, None) if isinstance(target, str) else \
            (target.owner, target.transform)
        try:
            tie(model, member, owner, transform=transform)
        except AdaptnetError as e:
            raise RecipeError(f"ties.{member}: {e}") from None
    for i, entry in enumerate(recipe.share):
        try:
            share(model, entry.modules, entry.owner, blocks=entry.blocks,
                  strategy=entry.strategy)
        except AdaptnetError as e:
            raise RecipeError(f"share[{i}]: {e}") from None
