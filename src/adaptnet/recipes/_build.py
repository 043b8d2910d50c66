"""A recipe's model: the zoo's builder or the user's own, then its ``ties:`` and ``share:``.

A recipe (or a run directory) whose model names ``builder:
"package.module:function"`` imports that module and calls the function: it
runs the user's code, as running a script does. The current directory is
searched first, as ``python -m`` does; then ``sys.path``.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from adaptnet._io import short, shown
from adaptnet.errors import AdaptnetError, RecipeError
from adaptnet.models import MODELS, build
from adaptnet.recipes._schema import ModelSpec, Recipe
from adaptnet.sharing import share, tie

__all__ = ["apply_sharing", "build_model", "builder_of", "builder_source", "import_builder"]


def import_builder(path: str) -> Callable[..., Any]:
    """The function ``"package.module:function"`` names, its module imported.

    Raises:
        RecipeError: a malformed path, a module that cannot be imported (with
            the exception it raised), or no such callable in it.
    """
    module, colon, attr = path.partition(":")
    names = [*module.split("."), *attr.split(".")]
    if not colon or not all(n.isidentifier() for n in names):
        raise RecipeError(f"model.builder {shown(path)} must look like "
                          "'package.module:function', e.g. 'mymodels:build_net'.")
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
    """The zoo builder ``spec.name`` or the user's ``spec.builder`` (imported)."""
    return MODELS[spec.name] if spec.name is not None else import_builder(str(spec.builder))


def builder_source(spec: ModelSpec) -> str | None:
    """For a user builder: ``"module (file)"``, the code a recipe or run imports; else None."""
    if spec.builder is None:
        return None
    fn = import_builder(spec.builder)
    mod = sys.modules.get(getattr(fn, "__module__", ""), None)
    where = getattr(mod, "__file__", None)
    return f"{spec.builder.partition(':')[0]} ({where})" if where else spec.builder


def build_model(spec: ModelSpec, args: dict[str, Any]) -> nn.Module:
    """The model ``spec`` names, built with ``args``."""
    if spec.name is not None:
        return build(spec.name, **args)
    fn = import_builder(str(spec.builder))
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
