"""YAML recipes: validated up front, overridable with ``key=value``, run into run directories."""

import importlib
import warnings

from adaptnet._renamed import warn_renamed
from adaptnet._rundir import RunResults
from adaptnet.recipes._build import code_notices
from adaptnet.recipes._compare import compare_variants, variants
from adaptnet.recipes._demo import flagship
from adaptnet.recipes._lookup import load_recipe, shipped_recipes
from adaptnet.recipes._prepare import (
    RunRecipe,
    load_model,
    load_run,
    prepare,
    read_run_config,
)
from adaptnet.recipes._run import RunResult, evaluate_run, pretrain, train_recipe
from adaptnet.recipes._schema import (
    Recipe,
    parse_overrides,
    validate_recipe,
)

__all__ = [
    "Recipe",
    "RunRecipe",
    "RunResult",
    "RunResults",
    "code_notices",
    "compare_variants",
    "evaluate_run",
    "flagship",
    "load_model",
    "load_recipe",
    "load_run",
    "parse_overrides",
    "prepare",
    "pretrain",
    "read_run_config",
    "shipped_recipes",
    "train_recipe",
    "validate_recipe",
    "variants",
]


def __getattr__(name: str):
    if name == "compare":  # adaptnet.compare compares models; this trains recipe variants
        warn_renamed("recipes.compare", "recipes.compare_variants", stacklevel=3)
        return compare_variants
    if name in ("Comparison", "compare_models", "time_together"):  # here until 0.1
        warnings.warn(f"adaptnet.recipes.{name} is now adaptnet.study.{name}; the old name "
                      "goes in adaptnet 0.2.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("adaptnet.study"), name)
    raise AttributeError(f"module 'adaptnet.recipes' has no attribute {name!r}")
