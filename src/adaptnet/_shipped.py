"""The shipped recipes' directory and their one-line descriptions.

Apart from ``adaptnet.recipes`` (which imports the library) so that ``adaptnet
recipes`` lists them without importing torch.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["RECIPES", "shipped_recipes"]

RECIPES = Path(__file__).resolve().parent / "recipes" / "shipped"


def shipped_recipes() -> dict[str, str]:
    """Shipped recipe names and their one-line descriptions.

    Example:
        >>> from adaptnet.recipes import shipped_recipes
        >>> "mnist1d-mlp" in shipped_recipes(), shipped_recipes()["digits-moe"][:40]
        (True, 'MLP with a top-1 mixture of 4 experts on')
    """
    out = {}
    for f in sorted(RECIPES.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            out[f.name.removesuffix(".yaml")] = str(
                yaml.safe_load(f.read_text(encoding="utf-8")).get("description", ""))
    return out
