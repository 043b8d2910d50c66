"""Benchmark: do the shipped adaptive recipes adapt? Mean depth and early exits vs full depth.

Every shipped adaptive-depth, ACT, PonderNet and early-exit recipe is trained
as shipped and as its full-depth variant (the same network, trained alike,
every sample through every step or stage):

- ``digits-adaptive-depth`` (ACT) vs ``model.halting=none``;
- ``parity-pondernet`` (PonderNet) vs ``model.halting=none``;
- ``mnist1d-early-exit`` and ``fashion-early-exit`` vs ``model.exits=false``.

Reported on the test split: accuracy of both, and the adaptive network's
mean steps over ``max_steps`` (target ≤ 0.6) or its share of early exits
(target ≥ 40%), with its accuracy within 1 point of the full-depth variant.
Fashion-MNIST is skipped (and says so) when its idx files are not installed.

    python benchmarks/bench_adaptive.py           # full (about 20 minutes on 2 cores)
    python benchmarks/bench_adaptive.py --quick   # smoke test: 64 samples, 1 epoch
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import parse_args, publish, table, train_seeds, verdict

from adaptnet.errors import DataError
from adaptnet.recipes import load_recipe, load_run
from adaptnet.train import evaluate

# recipe -> (full-depth overrides, what adapts)
TASKS = {"digits-adaptive-depth": ({"model.halting": "none"}, "steps"),
         "parity-pondernet": ({"model.halting": "none"}, "steps"),
         "mnist1d-early-exit": ({"model.exits": False}, "exits"),
         "fashion-early-exit": ({"model.exits": False}, "exits")}


def run(recipe: str, full: dict, kind: str, quick: bool, root: Path) -> dict:
    _, spec = load_recipe(recipe, [])
    extra = ["train.epochs=1"] if quick else []
    adaptive, fixed = train_seeds(recipe, {"adaptive": {}, "full depth": full}, extra, [0],
                                  root, 64 if quick else None)
    data, model, _ = load_run(adaptive["run_dir"])
    test = evaluate(model, data.test, loss="cross_entropy",
                    metrics=("accuracy", "steps", "exits"))
    out = {"recipe": recipe, "kind": kind, "accuracy": adaptive["value"],
           "full_accuracy": fixed["value"]}
    if kind == "steps":
        max_steps = spec.args("model")["max_steps"]
        return out | {"mean_steps": test["steps"], "max_steps": max_steps,
                      "fraction": test["steps"] / max_steps}
    stages = spec.args("model")["stages"]
    shares = [test.get("exits", {}).get(str(i), 0.0) for i in range(stages)]
    return out | {"exit_shares": shares, "early": 1.0 - shares[-1]}


def markdown(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        if "skipped" in r:
            rows.append([r["recipe"], "", "", "", f"skipped: {r['skipped']}", ""])
            continue
        gap = 100 * (r["accuracy"] - r["full_accuracy"])
        if r["kind"] == "steps":
            what = f"{r['mean_steps']:.2f} of {r['max_steps']} steps ({r['fraction']:.2f})"
            met = r["fraction"] <= 0.6
        else:
            what = f"{r['early']:.0%} leave early"
            met = r["early"] >= 0.4
        rows.append([r["recipe"], f"{100 * r['accuracy']:.2f}%",
                     f"{100 * r['full_accuracy']:.2f}%", f"{gap:+.2f}", what,
                     verdict(met and gap >= -1.0)])
    return "\n".join([
        *table(["recipe", "adaptive accuracy", "full-depth accuracy", "points",
                "adaptivity (test split)", "target (≤ 0.6 × max steps or ≥ 40% early exits, "
                "≤ 1 point lost)"], rows), "",
        "Seed 0, one training per variant, the recipes as shipped; the full-depth variant "
        "is the same network with every sample through every step (`model.halting=none`) "
        "or stage (`model.exits=false`). Early-exit recipes use their shipped threshold "
        "(no calibration)."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, (full, kind) in TASKS.items():
            try:
                runs.append(run(recipe, full, kind, args.quick, Path(tmp) / recipe))
            except DataError as e:
                runs.append({"recipe": recipe, "skipped": str(e).split(".")[0]})
    publish("adaptive", args, {"runs": runs}, markdown)


if __name__ == "__main__":
    main()
