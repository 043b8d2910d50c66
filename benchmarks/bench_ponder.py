"""Benchmark: adaptive computation on 8-bit parity: PonderNet vs ACT, accuracy and steps.

Recipe ``parity-pondernet`` (Banino et al. 2021's parity task at 8 bits: a
random number of random positions set to ±1, the target is whether the count
of +1 is odd; 18,000 training, 2,000 validation and 2,000 test vectors): a
GRU cell applied to the input until the halting policy stops it, at most 20
steps. The same model, seed and training are run with PonderNet's halting
(geometric prior, KL-regularised) and with ACT's (Graves 2016, ponder cost).
Reported: test accuracy and the mean number of steps executed per test
sample (evaluation halts each sample deterministically: PonderNet at the
median of its halting distribution, ACT when its cumulative halting
probability reaches 1 − ε).
Target: PonderNet reaches at least 99%.

    python benchmarks/bench_ponder.py           # full
    python benchmarks/bench_ponder.py --quick   # smoke test: 64 samples, 1 epoch
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

TARGET = 0.99


def run(seeds: list[int], overrides: list[str], limit: int | None) -> dict:
    plans = {"PonderNet": {"model.halting": "pondernet"}, "ACT": {"model.halting": "act"}}
    with tempfile.TemporaryDirectory() as tmp:
        rows = train_seeds("parity-pondernet", plans, overrides, seeds, Path(tmp), limit)
        for r in rows:
            r["steps"] = evaluate_run(r["run_dir"])["steps"]
    variants = {}
    for name in plans:
        mine = [r for r in rows if r["variant"] == name]
        variants[name] = {"unique_params": mine[0]["unique_params"],
                          "accuracy": spread([r["value"] for r in mine]),
                          "steps": spread([r["steps"] for r in mine]),
                          "per_seed": {r["seed"]: {"accuracy": r["value"], "steps": r["steps"]}
                                       for r in mine},
                          "train_seconds": spread([r["train_seconds"] for r in mine])}
    return {"seeds": seeds, "overrides": overrides, "variants": variants,
            "met": variants["PonderNet"]["accuracy"]["median"] >= TARGET}


def markdown(result: dict) -> str:
    rows = [[name, f"{v['unique_params']:,}", show(v["accuracy"]), show(v["steps"], ".2f"),
             f"{v['train_seconds']['median']:.0f}"]
            for name, v in result["variants"].items()]
    pn = result["variants"]["PonderNet"]["accuracy"]["median"]
    return "\n".join([
        *table(["halting", "params", "test accuracy", "mean steps (of 20)", "train s"], rows), "",
        f"Target (PonderNet ≥ {TARGET:.0%}): {pn:.2%}, {verdict(result['met'])}. "
        + settings(result)]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    result = run([0], ["train.epochs=1"], 64) if args.quick else run([0, 1], [], None)
    publish("ponder", args, result, markdown)


if __name__ == "__main__":
    main()
