"""Benchmark: ALBERT-style cross-layer sharing: encoder parameters vs accuracy.

Recipe ``mnist1d-albert`` (MNIST-1D as a sequence of 40 values; a 6-layer,
d_model 64, 4-head pre-norm transformer encoder; AdamW) trained with each
sharing mode: ``none`` (six distinct layers), ``attention`` (one self-attention
shared by all layers), ``ffn`` (one feed-forward block shared) and ``all``
(one layer applied six times, ALBERT's default). Encoder parameters are the
unique parameters of the six layers; the input projection, positions, final
norm and classifier are counted apart. The seeds (``SEEDS``) set
initialisation and data order; with several, the table gives the median and
the range of test accuracy.
Target: all-shared has at least 5× fewer encoder parameters and is within 1.5
points of no sharing.

    python benchmarks/bench_albert.py           # full
    python benchmarks/bench_albert.py --quick   # smoke test: 64 samples, 1 epoch
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import (
    parse_args,
    publish,
    settings,
    show,
    spread,
    table,
    train_seeds,
    verdict,
)

from adaptnet.recipes import load_run

MODES = ["none", "attention", "ffn", "all"]
TARGET_FEWER, TARGET_POINTS = 5.0, 1.5
# 20 epochs (the recipe has 40) and one seed keep the four trainings to about six minutes.
SEEDS, SETTINGS = [0], ["train.epochs=20"]


def encoder_params(run_dir: str) -> int:
    """Unique parameters of the encoder layers (``parameters()`` yields a shared tensor once)."""
    model = load_run(run_dir)[1]
    return sum(p.numel() for p in model.layers.parameters())


def run(seeds: list[int], overrides: list[str], limit: int | None) -> dict:
    plans = {m: {"model.sharing": m} for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        rows = train_seeds("mnist1d-albert", plans, overrides, seeds, Path(tmp), limit)
        encoder = {m: encoder_params(next(r["run_dir"] for r in rows if r["variant"] == m))
                   for m in MODES}
    modes = {}
    for m in MODES:
        mine = [r for r in rows if r["variant"] == m]
        modes[m] = {"unique_params": mine[0]["unique_params"], "encoder_params": encoder[m],
                    "accuracy": spread([r["value"] for r in mine]),
                    "per_seed": {r["seed"]: r["value"] for r in mine},
                    "train_seconds": spread([r["train_seconds"] for r in mine])}
    fewer = encoder["none"] / encoder["all"]
    points = (modes["none"]["accuracy"]["median"] - modes["all"]["accuracy"]["median"]) * 100
    return {"seeds": seeds, "overrides": overrides, "modes": modes,
            "all_vs_none": {"fewer_encoder_params": fewer, "points_lost": points,
                            "met": fewer >= TARGET_FEWER and points <= TARGET_POINTS}}


def markdown(result: dict) -> str:
    none = result["modes"]["none"]
    rows = [[m, f"{r['encoder_params']:,}", f"{none['encoder_params'] / r['encoder_params']:.1f}",
             f"{r['unique_params']:,}", show(r["accuracy"]),
             f"{(r['accuracy']['median'] - none['accuracy']['median']) * 100:+.1f}",
             f"{r['train_seconds']['median']:.0f}"]
            for m, r in result["modes"].items()]
    a = result["all_vs_none"]
    return "\n".join([
        *table(["sharing", "encoder params", "fewer (×)", "all params",
                "test accuracy, median (min–max)", "points vs none", "train s"], rows), "",
        f"Target (all vs none: ≥ {TARGET_FEWER:g}× fewer encoder parameters within "
        f"{TARGET_POINTS:g} points): {a['fewer_encoder_params']:.1f}× fewer, "
        f"{a['points_lost']:+.1f} points lost: {verdict(a['met'])}. {settings(result)}"]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    result = run([0], ["train.epochs=1"], 64) if args.quick else run(SEEDS, SETTINGS, None)
    publish("albert", args, result, markdown)


if __name__ == "__main__":
    main()
