"""Comparing variants of a recipe side by side (``--vary``): the rows
:func:`adaptnet.study.compare_models` gives for models from a script (parameters, the
headline metric, executed MACs per sample, inference time from one side-by-side timing,
training time), each variant a run directory."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from adaptnet import _rundir
from adaptnet.errors import RecipeError
from adaptnet.recipes._lookup import load_recipe
from adaptnet.recipes._prepare import load_run
from adaptnet.recipes._run import train_recipe
from adaptnet.recipes._schema import parse_overrides
from adaptnet.study import time_together

__all__ = ["compare_variants", "variants"]


def variants(vary: list[str]) -> dict[str, dict[str, Any]]:
    """The cartesian product of ``key=v1,v2`` options: ``{label: overrides}``.

    Example:
        >>> from adaptnet.recipes import variants
        >>> variants(["model.hidden=16,32", "train.lr=0.1"])  # doctest: +NORMALIZE_WHITESPACE
        {'hidden=16,lr=0.1': {'model.hidden': 16, 'train.lr': 0.1},
         'hidden=32,lr=0.1': {'model.hidden': 32, 'train.lr': 0.1}}
    """
    axes = []
    for item in vary:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise RecipeError(f"--vary {item!r} must look like key=v1,v2 (e.g. "
                              "model.tied=true,false).")
        axes.append([(key, parse_overrides([f"{key}={v}"])[key]) for v in values.split(",")])
    return {",".join(f"{k.rsplit('.', 1)[-1]}={json.dumps(x)}" for k, x in combo): dict(combo)
            for combo in itertools.product(*axes)}


def run_name(i: int, label: str) -> str:
    """The directory of variant ``i``: its label as typed (``0-mode=frozen,lr=0.1``), quotes
    dropped, any character a file name should not hold (``/``, spaces, ...) as ``_``."""
    kept = "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in label.replace('"', ""))
    return f"{i}-{kept[:60]}"


def compare_variants(name_or_path: str, plans: dict[str, dict[str, Any]], overrides: list[str],
            out: Path, *, limit: int | None = None, trust_code: bool = False
            ) -> list[dict[str, Any]]:
    """Train each variant (``{label: overrides}``) of a recipe into ``out/<i>-<label>``.

    Every variant is validated before the first one trains. Returns one row of
    results per variant (also written to ``out/compare.json``); their inference
    times come from one side-by-side timing of every variant
    (:func:`time_together`), not from each run's own. ``trust_code``: as
    :func:`train_recipe`'s.
    """
    base = parse_overrides(overrides)
    checked = [(label, v, *load_recipe(name_or_path, {**base, **v}))
               for label, v in plans.items()]
    rows, trained = [], {}
    for i, (label, v, name, recipe) in enumerate(checked):
        res = train_recipe(name, recipe, out / run_name(i, label), limit=limit,
                           trust_code=trust_code)
        r = res.results
        metric, value = r.metric
        rows.append({"variant": label, "overrides": v, "run_dir": str(res.run_dir),
                     "unique_params": r.params["unique"],
                     "trainable_params": r.params["trainable"],
                     "per_use_params": r.params["per_use"],
                     "metric": metric, "value": value,
                     "macs": r.test.get("macs"),
                     "infer_ms_per_1k": r.infer_ms_per_1k,
                     "train_seconds": r.train_seconds})
        if r.decode is not None:  # a Hugging Face model's decoding against its base
            rows[-1] |= {k: r.decode[k] for k in
                         ("tokens_per_s", "agreement", "layers_per_token")}
        trained[label] = res.run_dir
    if len(rows) > 1:  # time the variants side by side, in the same rounds
        loaded = {label: load_run(run, trust_code=trust_code)[:2]
                  for label, run in trained.items()}
        x = next(iter(loaded.values()))[0].test.tensors[0][:1024]
        times = time_together({label: model for label, (_, model) in loaded.items()}, x)
        for row in rows:
            row["infer_ms_per_1k"] = times[row["variant"]]
    _rundir.write_json(out / "compare.json", rows)
    return rows
