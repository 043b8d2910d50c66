"""Benchmark: a transposed tie in an autoencoder: reconstruction error at equal epochs.

Recipe ``digits-tied-autoencoder`` (8×8 digits, 64 → 32 → 64, the decoder
weight the encoder's transposed) against the same network untied
(``model.tied=false``), ``EPOCHS`` epochs each (the recipe has 40) with the
learning rate annealed to zero over them (cosine), over ``SEEDS``: unique
parameters and test reconstruction error (mean squared error), median
(min–max). The table gives how much the validation loss still moved over the
last quarter of the epochs, the evidence that both have converged.

    python benchmarks/bench_autoencoder.py           # full (a few minutes)
    python benchmarks/bench_autoencoder.py --quick   # smoke test: 64 images, 1 epoch
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import annealed, parse_args, publish, settled, show, spread, table, train_seeds

SEEDS, EPOCHS = [0, 1, 2], 200


def run(seeds: list[int], overrides: list[str], limit: int | None) -> dict:
    plans = {"tied": {"model.tied": True}, "untied": {"model.tied": False}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = train_seeds("digits-tied-autoencoder", plans, overrides, seeds, Path(tmp), limit)
    variants = {}
    for name in plans:
        mine = [r for r in rows if r["variant"] == name]
        variants[name] = {"unique_params": mine[0]["unique_params"],
                          "test_mse": spread([r["value"] for r in mine]),
                          "last_quarter": spread([settled(r["history"]) for r in mine]),
                          "per_seed": {r["seed"]: r["value"] for r in mine}}
    return {"seeds": seeds, "overrides": overrides, "epochs": rows[0]["epochs"],
            "variants": variants}


def markdown(result: dict) -> str:
    v = result["variants"]
    rows = [[name, f"{r['unique_params']:,}", show(r["test_mse"], ".5f"),
             show(r["last_quarter"], ".1%")] for name, r in v.items()]
    ratio = v["tied"]["test_mse"]["median"] / v["untied"]["test_mse"]["median"]
    fewer = 1 - v["tied"]["unique_params"] / v["untied"]["unique_params"]
    return "\n".join([
        *table(["variant", "unique params", "test reconstruction error (MSE)",
                "validation loss fall, last quarter"], rows), "",
        f"Tied / untied reconstruction error: {ratio:.2f}× at {fewer:.0%} fewer parameters. "
        f"Settings: {', '.join(result['overrides']) or 'the recipe as shipped'}; seeds "
        f"{', '.join(map(str, result['seeds']))}; median (min–max)."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    result = run([0], ["train.epochs=1"], 64) if args.quick \
        else run(SEEDS, annealed("digits-tied-autoencoder", EPOCHS), None)
    publish("autoencoder", args, result, markdown)


if __name__ == "__main__":
    main()
