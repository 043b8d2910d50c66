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
    """Shipped recipe names and their one-line descriptions."""
    out = {}
    for f in sorted(RECIPES.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            out[f.name.removesuffix(".yaml")] = str(
                yaml.safe_load(f.read_text(encoding="utf-8")).get("description", ""))
    return out
