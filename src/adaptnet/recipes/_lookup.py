"""Finding recipes: shipped names and files, overrides applied, validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptnet._shipped import shipped_recipes
from adaptnet.errors import RecipeError
from adaptnet.recipes._schema import (
    RECIPES,
    Recipe,
    _close,
    apply_overrides,
    parse_overrides,
    read_recipe,
    validate_recipe,
)

__all__ = ["load_recipe", "shipped_recipes"]


def load_recipe(name_or_path: str | Path, overrides: list[str] | dict[str, Any] = ()
                ) -> tuple[str, Recipe]:
    """``(name, recipe)`` from a file or a shipped recipe name, overrides applied, validated.

    Example:
        >>> from adaptnet.recipes import load_recipe
        >>> name, recipe = load_recipe("mnist1d-mlp", ["train.epochs=2", "model.hidden=32"])
        >>> name, recipe.train["epochs"], recipe.args("model")
        ('mnist1d-mlp', 2, {'hidden': 32})
    """
    p = Path(name_or_path)
    if not p.is_file():
        shipped = RECIPES / f"{name_or_path}.yaml"
        if not shipped.is_file():
            names = list(shipped_recipes())
            raise RecipeError(f"no recipe file {str(name_or_path)!r}, and no shipped recipe of "
                              f"that name{_close(str(name_or_path), names)}; shipped: "
                              f"{', '.join(names)} (`adaptnet recipes` describes them).")
        p = Path(str(shipped))
    raw = read_recipe(p)
    if not isinstance(overrides, dict):
        overrides = parse_overrides(list(overrides))
    return p.stem, validate_recipe(apply_overrides(raw, overrides))

