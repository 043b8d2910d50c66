"""YAML recipes: validated up front, overridable with ``key=value``, run into run directories."""

from adaptnet.recipes._build import code_notices
from adaptnet.recipes._compare import Comparison, compare, compare_models, variants
from adaptnet.recipes._demo import DemoResult, DemoRow, flagship
from adaptnet.recipes._lookup import load_recipe, shipped_recipes
from adaptnet.recipes._measure import time_together
from adaptnet.recipes._prepare import RunRecipe, load_run, prepare, read_run_config
from adaptnet.recipes._run import RunResult, evaluate_run, pretrain, train_recipe
from adaptnet.recipes._schema import (
    Recipe,
    parse_overrides,
    validate_recipe,
)

__all__ = [
    "Comparison",
    "DemoResult",
    "DemoRow",
    "Recipe",
    "RunRecipe",
    "RunResult",
    "code_notices",
    "compare",
    "compare_models",
    "evaluate_run",
    "flagship",
    "load_recipe",
    "load_run",
    "parse_overrides",
    "prepare",
    "pretrain",
    "read_run_config",
    "shipped_recipes",
    "time_together",
    "train_recipe",
    "validate_recipe",
    "variants",
]
