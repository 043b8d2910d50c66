"""Benchmark: transfer on Fashion-MNIST, classes 0-4 -> 5-9, with a small labelled budget.

The zoo's ``small_cnn`` is pretrained once on classes 0-4 (recipe
``fashion-pretrain``, seed 0). It is then trained on classes 5-9 with
``train_per_class`` labelled images per class by each variant of recipe
``transfer-fashion``. Every variant has the same architecture, optimizer and
epochs. Each (budget, seed) pair draws its own labelled subset and runs all
the variants; medians and ranges are over the seeds. The test set is the
5,000 test images of classes 5-9.

    python benchmarks/bench_transfer.py            # full (about 8 minutes on 2 cores)
    python benchmarks/bench_transfer.py --quick    # smoke test, 64 samples, 1 epoch
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from _common import parse_args, publish, show, spread, table

from adaptnet.recipes import compare_variants, load_recipe, pretrain

VARIANTS = {
    "frozen backbone, new head": {"transfer.mode": "frozen"},
    "frozen, last 3 blocks train": {"transfer.mode": "frozen", "transfer.trainable_blocks": 3},
    "gradual unfreezing, 1 block / 5 epochs": {"transfer.mode": "frozen",
                                                "transfer.unfreeze_every": 5},
    "full fine-tune": {"transfer.mode": "finetune", "transfer.backbone_lr": 1.0},
    "full fine-tune, backbone lr × 0.1": {"transfer.mode": "finetune",
                                          "transfer.backbone_lr": 0.1},
    "from scratch": {"transfer.mode": "scratch"},
}


def run(budgets: list[int], seeds: list[int], limit: int | None, quick: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, recipe = load_recipe("transfer-fashion", quick)
        backbone = pretrain(recipe.transfer, root, limit)
        source = json.loads((backbone / "results.json").read_text())
        rows = []
        for budget in budgets:
            for seed in seeds:
                overrides = [*quick, f"seed={seed}", f"data.seed={seed}",
                             f"data.train_per_class={budget}",
                             f"transfer.backbone={backbone}"]
                for r in compare_variants("transfer-fashion", VARIANTS, overrides,
                                 root / f"{budget}-{seed}", limit=limit):
                    rows.append({"budget": budget, "seed": seed, **r})
    summary = []
    for budget in budgets:
        for label in VARIANTS:
            mine = [r for r in rows if r["budget"] == budget and r["variant"] == label]
            acc = [r["value"] for r in mine]
            summary.append({"budget": budget, "variant": label,
                            "trainable": mine[0]["trainable_params"],
                            "unique": mine[0]["unique_params"],
                            **spread(acc),
                            "train_seconds": statistics.median(r["train_seconds"]
                                                               for r in mine)})
    return {"seeds": seeds, "source_test_accuracy": source["test"]["accuracy"],
            "source_train_seconds": source["train_seconds"], "summary": summary, "runs": rows}


def markdown(result: dict, backbone: str = "small_cnn") -> str:
    rows = [[s["budget"], s["variant"], f"{s['trainable']:,} of {s['unique']:,}",
             show(s), f"{s['train_seconds']:.1f}"] for s in result["summary"]]
    return "\n".join([
        f"Backbone: {backbone} pretrained on classes 0-4, test accuracy "
        f"{result['source_test_accuracy']:.2%} ({result['source_train_seconds']:.0f} s).", "",
        *table(["labels / class", "variant", "trainable params (at the end)",
                f"test accuracy, median (min–max over seeds "
                f"{', '.join(map(str, result['seeds']))})", "train s"], rows)]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        result = run([5], [0], 64, ["train.epochs=1"])
    else:
        result = run([100, 10], [0, 1, 2], None, [])
    publish("transfer", args, result, markdown)


if __name__ == "__main__":
    main()
