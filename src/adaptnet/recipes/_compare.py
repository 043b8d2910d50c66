"""Comparing variants side by side: of a recipe (``--vary``), or of models from a script."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from adaptnet import _rundir
from adaptnet.errors import RecipeError
from adaptnet.recipes._lookup import load_recipe
from adaptnet.recipes._measure import time_together
from adaptnet.recipes._prepare import load_run
from adaptnet.recipes._run import train_recipe
from adaptnet.recipes._schema import parse_overrides

__all__ = ["compare", "variants"]


def variants(vary: list[str]) -> dict[str, dict[str, Any]]:
    """The cartesian product of ``key=v1,v2`` options: ``{label: overrides}``."""
    axes = []
    for item in vary:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise RecipeError(f"--vary {item!r} must look like key=v1,v2 (e.g. "
                              "model.tied=true,false).")
        axes.append([(key, parse_overrides([f"{key}={v}"])[key]) for v in values.split(",")])
    return {",".join(f"{k.rsplit('.', 1)[-1]}={json.dumps(x)}" for k, x in combo): dict(combo)
            for combo in itertools.product(*axes)}


def compare(name_or_path: str, plans: dict[str, dict[str, Any]], overrides: list[str],
            out: Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Train each variant (``{label: overrides}``) of a recipe into ``out/<i>-<label>``.

    Every variant is validated before the first one trains. Returns one row of
    results per variant (also written to ``out/compare.json``); their inference
    times come from one side-by-side timing of every variant
    (:func:`time_together`), not from each run's own.
    """
    base = parse_overrides(overrides)
    checked = [(label, v, *load_recipe(name_or_path, {**base, **v}))
               for label, v in plans.items()]
    rows, trained = [], {}
    for i, (label, v, name, recipe) in enumerate(checked):
        slug = f"{i}-" + "".join(c if c.isalnum() else "_" for c in label)[:60]
        res = train_recipe(name, recipe, out / slug, limit=limit)
        metric, value = res.values["metric"]
        rows.append({"variant": label, "overrides": v, "run_dir": str(res.run_dir),
                     "unique_params": res.values["params"]["unique"],
                     "trainable_params": res.values["params"]["trainable"],
                     "per_use_params": res.values["params"]["per_use"],
                     "metric": metric, "value": value,
                     "macs": res.values["test"].get("macs"),
                     "infer_ms_per_1k": res.values["infer_ms_per_1k"],
                     "train_seconds": res.values["train_seconds"]})
        trained[label] = res.run_dir
    if len(rows) > 1:  # time the variants side by side, in the same rounds
        loaded = {label: load_run(run)[:2] for label, run in trained.items()}
        x = next(iter(loaded.values()))[0].test.tensors[0][:1024]
        times = time_together({label: model for label, (_, model) in loaded.items()}, x)
        for row in rows:
            row["infer_ms_per_1k"] = times[row["variant"]]
    _rundir.write_json(out / "compare.json", rows)
    return rows

