"""YAML recipes: validated up front, overridable with ``key=value``, run into run directories."""

from adaptnet.recipes._demo import DemoResult, DemoRow, flagship
from adaptnet.recipes._run import (
    RunResult,
    compare,
    evaluate_run,
    load_recipe,
    load_run,
    prepare,
    shipped_recipes,
    time_together,
    train_recipe,
)
from adaptnet.recipes._schema import (
    Recipe,
    apply_overrides,
    parse_overrides,
    read_recipe,
    validate_recipe,
)

__all__ = [
    "DemoResult",
    "DemoRow",
    "Recipe",
    "RunResult",
    "apply_overrides",
    "compare",
    "evaluate_run",
    "flagship",
    "load_recipe",
    "load_run",
    "parse_overrides",
    "prepare",
    "read_recipe",
    "shipped_recipes",
    "time_together",
    "train_recipe",
    "validate_recipe",
]
