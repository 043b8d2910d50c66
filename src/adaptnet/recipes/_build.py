"""A recipe's model: the zoo's builder or the user's own, then its ``ties:`` and ``share:``.

A user's builder is imported only when trusted (``_trust``); :func:`code_of`
finds, without importing anything, the code a recipe would run.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from adaptnet import _rundir
from adaptnet._io import short, shown
from adaptnet.errors import AdaptnetError, RecipeError, RunDirError
from adaptnet.models import MODELS, build
from adaptnet.recipes._hf import RECIPE_MODELS
from adaptnet.recipes._lookup import load_recipe
from adaptnet.recipes._schema import ModelSpec, Recipe, check_args
from adaptnet.recipes._trust import import_builder, module_of, refuse_code
from adaptnet.sharing import share, tie

__all__ = ["apply_sharing", "build_model", "builder_of", "code_notices", "code_of"]


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
    try:
        inner = load_recipe(backbone)[1]
    except RecipeError:  # reported where the backbone is loaded
        return paths
    return paths + code_of(inner, seen | {backbone})


def code_notices(recipe: Recipe, trust_code: bool) -> list[str]:
    """What to tell the user before running ``recipe``: ``"module (where it is)"`` for each
    module its builders import, found without importing anything.

    Raises:
        RecipeError: the recipe names code and ``trust_code`` is False (naming
            the modules and the opt-in).

    Example:
        >>> from adaptnet.recipes import code_notices, load_recipe
        >>> # names no code: nothing to say
        >>> code_notices(load_recipe("mnist1d-mlp")[1], trust_code=False)
        []
    """
    paths = code_of(recipe)
    if paths and not trust_code:
        refuse_code(paths)
    notices = []
    for module in dict.fromkeys(module_of(p) for p in paths):
        top = module.split(".")[0]
        spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path])
        where = spec.origin if spec is not None and spec.origin else "not found"
        notices.append(f"{module} ({where})")
    return notices


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
