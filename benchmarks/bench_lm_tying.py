"""Benchmark: embedding/output tying in a word-level LSTM language model, trained to convergence.

Recipe ``shakespeare-lstm`` (34 plays for training, Macbeth and Twelfth Night
for validation, Hamlet and The Tempest for test; lowercased words, the 10,000
most frequent training words; a 2-layer LSTM, dropout 0.3, Adam 0.002) at two
widths (embedding = LSTM width), trained tied (the output layer reuses the
embedding matrix; Press & Wolf 2017, Inan et al. 2017) and untied with the
same seeds, in batches of ``BATCH`` windows. Small batches are what make
convergence affordable on a CPU: at width 64 a step of 16 windows takes a
sixth of the time of a step of 64 (measured; the smaller logits tensor
probably stays in cache), and after 1,652 steps validation perplexity was 238 with 16 against
245 with 64. Each run trains until the validation loss has not improved for
``PATIENCE`` epochs (at most ``MAX_EPOCHS``); the table gives the final
model's test perplexity, the best validation perplexity and the epochs
trained, median (min–max) over ``SEEDS``. Target: tied has at
least 30% fewer parameters and a test perplexity no worse than untied, at
both widths.

Runs go to ``runs/bench/lm_tying/`` (one directory per variant, width and
seed): the benchmark can be cut and run again; finished runs are read back,
a cut one resumes from its last epoch. Each finished run's ``results.json``
is also kept in ``benchmarks/results/runs/lm_tying/`` (committed): a run
kept there is not trained again.

    python benchmarks/bench_lm_tying.py           # full (hours on 2 cores)
    python benchmarks/bench_lm_tying.py --quick   # smoke test: 64 windows, tiny model
"""

from __future__ import annotations

import math
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

WIDTHS, SEEDS = [64, 128], [0, 1, 2]
MAX_EPOCHS, PATIENCE, BATCH = 40, 2, 16
LM = [f"train.batch_size={BATCH}", f"train.epochs={MAX_EPOCHS}", f"train.early_stopping={PATIENCE}"]
TARGET_FEWER = 0.30


def lm(widths: list[int], seeds: list[int], overrides: list[str], root: Path, keep: Path,
       limit: int | None) -> list[dict]:
    plans = {"tied": {"model.tied": True}, "untied": {"model.tied": False}}
    out = []
    for width in widths:
        size = [f"model.embed_size={width}", f"model.hidden={width}"]
        rows = train_seeds("shakespeare-lstm", plans, [*overrides, *size], seeds,
                           root / f"width-{width}", limit, keep / f"width-{width}")
        variants = {}
        for name in plans:
            mine = [r for r in rows if r["variant"] == name]
            variants[name] = {
                "unique_params": mine[0]["unique_params"],
                "test_perplexity": spread([r["value"] for r in mine]),
                # the final model's, from its last epoch's validation pass
                "valid_perplexity": spread(
                    [math.exp(r["history"][-1]["val/loss"]) for r in mine]),
                "best_valid_perplexity": spread(
                    [math.exp(min(h["val/loss"] for h in r["history"])) for r in mine]),
                "epochs": spread([r["epochs"] for r in mine]),
                "converged": [stopped_early(r["history"], PATIENCE) for r in mine],
                "per_seed": {r["seed"]: r["value"] for r in mine}}
        tied, untied = variants["tied"], variants["untied"]
        fewer = 1 - tied["unique_params"] / untied["unique_params"]
        no_worse = tied["test_perplexity"]["median"] <= untied["test_perplexity"]["median"]
        out.append({"width": width, "variants": variants, "fewer_params": fewer,
                    "perplexity_no_worse": no_worse,
                    "met": fewer >= TARGET_FEWER and no_worse})
    return out


def run(widths: list[int], seeds: list[int], overrides: list[str], root: Path, keep: Path,
        limit: int | None) -> dict:
    return {"seeds": seeds, "max_epochs": MAX_EPOCHS, "patience": PATIENCE,
            "overrides": overrides, "lm": lm(widths, seeds, overrides, root, keep, limit)}


def markdown(result: dict) -> str:
    rows = []
    for w in result["lm"]:
        for name, v in w["variants"].items():
            done = sum(v["converged"])
            rows.append([f"{w['width']}", name, f"{v['unique_params']:,}",
                         show(v["test_perplexity"], ".1f"), show(v["best_valid_perplexity"], ".1f"),
                         show(v["epochs"], ".0f"), f"{done}/{len(v['converged'])}"])
    verdicts = "; ".join(
        f"width {w['width']}: {w['fewer_params']:.1%} fewer, perplexity "
        f"{'no worse' if w['perplexity_no_worse'] else 'worse'}, {verdict(w['met'])}"
        for w in result["lm"])
    return "\n".join([
        *table(["width", "variant", "unique params", "test perplexity",
                "best valid perplexity", "epochs", "stopped early"], rows), "",
        f"{stopping(result)} Target (tied ≥ {TARGET_FEWER:.0%} fewer parameters, test "
        f"perplexity no worse): {verdicts}."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    root = runs_root("lm_tying", args)
    if args.quick:
        result = run([16], [0], ["model.embed_size=16", "model.hidden=16", "data.max_vocab=200",
                                 "train.epochs=2", f"train.early_stopping={PATIENCE}"],
                     root, args.out / "lm_tying-quick-kept", 64)
    else:
        result = run(WIDTHS, SEEDS, LM, root, RESULTS / "runs" / "lm_tying", None)
    publish("lm_tying", args, result, markdown)


if __name__ == "__main__":
    main()
