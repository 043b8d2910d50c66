"""Benchmark: embedding/output weight tying in a word-level LSTM language model.

Recipe ``shakespeare-lstm`` (34 plays for training, Macbeth and Twelfth Night
for validation, Hamlet and The Tempest for test; lowercased words, the 10,000
most frequent training words) with the same width for the embedding and the
LSTM, trained tied (the output layer reuses the embedding matrix; Press &
Wolf 2017, Inan et al. 2017) and untied, with the same seed, optimizer and
epochs. Reported: unique parameters, and validation and test perplexity of
the final model. Target: tied has at least 30% fewer parameters and a
perplexity no worse than untied.

    python benchmarks/bench_lm_tying.py           # full
    python benchmarks/bench_lm_tying.py --quick   # smoke test: 64 windows, 1 epoch
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

from adaptnet.recipes import evaluate_run

# Width 128 and one epoch keep the run to about seven minutes on 2 CPU cores.
SIZE = ["model.embed_size=128", "model.hidden=128", "train.batch_size=64", "train.epochs=1"]
TARGET_FEWER = 0.30


def run(seeds: list[int], overrides: list[str], limit: int | None) -> dict:
    plans = {"tied": {"model.tied": True}, "untied": {"model.tied": False}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = train_seeds("shakespeare-lstm", plans, overrides, seeds, Path(tmp), limit)
        for r in rows:
            r["valid_perplexity"] = evaluate_run(r["run_dir"], "valid")["perplexity"]
    variants = {}
    for name in plans:
        mine = [r for r in rows if r["variant"] == name]
        variants[name] = {"unique_params": mine[0]["unique_params"],
                          "per_use_params": mine[0]["per_use_params"],
                          "valid_perplexity": spread([r["valid_perplexity"] for r in mine]),
                          "test_perplexity": spread([r["value"] for r in mine]),
                          "train_seconds": spread([r["train_seconds"] for r in mine])}
    tied, untied = variants["tied"], variants["untied"]
    fewer = 1 - tied["unique_params"] / untied["unique_params"]
    no_worse = tied["test_perplexity"]["median"] <= untied["test_perplexity"]["median"]
    return {"seeds": seeds, "overrides": overrides, "variants": variants,
            "tied_vs_untied": {"fewer_params": fewer, "perplexity_no_worse": no_worse,
                               "met": fewer >= TARGET_FEWER and no_worse}}


def markdown(result: dict) -> str:
    rows = [[name, f"{v['unique_params']:,}", show(v["valid_perplexity"], ".1f"),
             show(v["test_perplexity"], ".1f"), f"{v['train_seconds']['median']:.0f}"]
            for name, v in result["variants"].items()]
    c = result["tied_vs_untied"]
    return "\n".join([
        *table(["variant", "unique params", "valid perplexity", "test perplexity", "train s"],
               rows), "",
        f"{settings(result)} Target (tied ≥ {TARGET_FEWER:.0%} fewer parameters, test "
        "perplexity no worse): "
        f"{c['fewer_params']:.1%} fewer, perplexity "
        f"{'no worse' if c['perplexity_no_worse'] else 'worse'}: {verdict(c['met'])}."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        result = run([0], ["model.embed_size=16", "model.hidden=16", "data.max_vocab=200",
                             "train.epochs=1"], 64)
    else:
        result = run([0], SIZE, None)
    publish("lm_tying", args, result, markdown)


if __name__ == "__main__":
    main()
