"""Benchmark: ALBERT-style cross-layer sharing in a character-level language model, converged.

Recipe ``shakespeare-decoder`` (character-level Shakespeare, 64-character
windows; a pre-norm decoder of ``LAYERS`` blocks, width ``WIDTH``, AdamW)
trained with each sharing of its blocks, applied by the recipe's ``share:``
section (:func:`adaptnet.share`):

- ALBERT's ablation (Lan et al. 2020, Table 4): ``none`` (distinct blocks),
  ``attention`` (one attention, ``qkv`` and ``proj``, for every block),
  ``ffn`` (one feed-forward block) and ``all`` (one block applied ``LAYERS``
  times);
- Takase & Kiyono (2021) at equal parameters: ``LAYERS / 2`` distinct blocks
  ordered ``cycle`` (0 1 2 0 1 2) or ``sequence`` (0 0 1 1 2 2).

Each run trains until the validation loss has not improved for ``PATIENCE``
epochs (at most ``MAX_EPOCHS``); the table gives the final model's test
perplexity, median (min–max) over ``SEEDS``, and the training perplexity
at the epoch with the best validation loss (the weights early stopping
keeps): a sharing that is higher there as well lacks capacity rather than
generalising worse. Encoder parameters are the blocks' unique parameters
(embedding, final norm and the tied head apart).
Target: all-shared has at least 5× fewer encoder parameters within 5% of
no sharing's perplexity.

Runs go to ``runs/bench/albert/``: the benchmark can be cut and run again.
Each finished run's ``results.json`` is also kept in
``benchmarks/results/runs/albert/`` (committed): a run kept there is not
trained again.

    python benchmarks/bench_albert.py           # full (hours on 2 cores)
    python benchmarks/bench_albert.py --quick   # smoke test: 64 windows, 1 epoch
"""

from __future__ import annotations

from pathlib import Path

from _common import (
    RESULTS,
    parse_args,
    publish,
    runs_root,
    show,
    spread,
    stopped_early,
    stopping,
    table,
    train_seeds,
    verdict,
)

from adaptnet.recipes import load_recipe, parse_overrides, prepare

LAYERS, WIDTH, SEEDS = 6, 64, [0, 1, 2]
MAX_EPOCHS, PATIENCE = 30, 2
SETTINGS = [f"model.layers={LAYERS}", f"model.d_model={WIDTH}", f"train.epochs={MAX_EPOCHS}",
            f"train.early_stopping={PATIENCE}"]
TARGET_FEWER, TARGET_WORSE = 5.0, 0.05


def plans(layers: int) -> dict[str, dict]:
    def each(part: str) -> list[str]:
        return [f"blocks.{i}.{part}" for i in range(layers)]

    return {"none": {},
            "attention": {"share": [{"modules": each("qkv")}, {"modules": each("proj")}]},
            "ffn": {"share": {"modules": each("mlp")}},
            "all": {"share": {"modules": "blocks"}},
            "cycle": {"share": {"modules": "blocks", "blocks": layers // 2,
                                "strategy": "cycle"}},
            "sequence": {"share": {"modules": "blocks", "blocks": layers // 2,
                                   "strategy": "sequence"}}}


def encoder_params(overrides: list[str], plan: dict, limit: int | None) -> int:
    """Unique parameters of the blocks of an untrained model built as the variant is
    (``parameters()`` yields a shared tensor once)."""
    _, recipe = load_recipe("shakespeare-decoder", {**parse_overrides(overrides), **plan})
    return sum(p.numel() for p in prepare(recipe, limit)[1].blocks.parameters())


def train_at_best(history: list[dict]) -> float:
    """Training perplexity in the epoch with the lowest validation loss."""
    return min(history, key=lambda row: row["val/loss"])["train/perplexity"]


def run(layers: int, seeds: list[int], overrides: list[str], root: Path, keep: Path,
        limit: int | None) -> dict:
    variants = plans(layers)
    rows = train_seeds("shakespeare-decoder", variants, overrides, seeds, root, limit, keep)
    modes = {}
    for m, plan in variants.items():
        mine = [r for r in rows if r["variant"] == m]
        modes[m] = {"encoder_params": encoder_params(overrides, plan, limit),
                    "unique_params": mine[0]["unique_params"],
                    "test_perplexity": spread([r["value"] for r in mine]),
                    "train_perplexity_at_best": spread([train_at_best(r["history"])
                                                        for r in mine]),
                    "epochs": spread([r["epochs"] for r in mine]),
                    "stopped_early": sum(stopped_early(r["history"], PATIENCE) for r in mine),
                    "per_seed": {r["seed"]: r["value"] for r in mine}}
    none, shared = modes["none"], modes["all"]
    fewer = none["encoder_params"] / shared["encoder_params"]
    worse = shared["test_perplexity"]["median"] / none["test_perplexity"]["median"] - 1
    return {"seeds": seeds, "overrides": overrides, "max_epochs": MAX_EPOCHS,
            "patience": PATIENCE, "modes": modes,
            "all_vs_none": {"fewer_encoder_params": fewer, "perplexity_worse": worse,
                            "met": fewer >= TARGET_FEWER and worse <= TARGET_WORSE}}


def markdown(result: dict) -> str:
    none = result["modes"]["none"]
    rows = [[m, f"{r['encoder_params']:,}", f"{none['encoder_params'] / r['encoder_params']:.1f}",
             f"{r['unique_params']:,}", show(r["test_perplexity"], ".3f"),
             f"{r['test_perplexity']['median'] / none['test_perplexity']['median'] - 1:+.1%}",
             show(r["train_perplexity_at_best"], ".3f"), show(r["epochs"], ".0f"),
             f"{r['stopped_early']}/{len(r['per_seed'])}"]
            for m, r in result["modes"].items()]
    a = result["all_vs_none"]
    return "\n".join([
        *table(["sharing", "encoder params", "fewer (×)", "all params", "test perplexity",
                "vs none", "train perplexity at best epoch", "epochs", "stopped early"],
              rows), "",
        f"{stopping(result)} Target (all vs none: ≥ {TARGET_FEWER:g}× fewer encoder "
        f"parameters within {TARGET_WORSE:.0%} perplexity): "
        f"{a['fewer_encoder_params']:.1f}× fewer, {a['perplexity_worse']:+.1%}: "
        f"{verdict(a['met'])}."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    root = runs_root("albert", args)
    if args.quick:
        result = run(4, [0], ["model.layers=4", "model.d_model=32", "train.epochs=1",
                              "data.max_tokens=8192"], root, args.out / "albert-quick-kept", 64)
    else:
        result = run(LAYERS, SEEDS, SETTINGS, root, RESULTS / "runs" / "albert", None)
    publish("albert", args, result, markdown)


if __name__ == "__main__":
    main()
