"""Benchmark: torchvision's ResNet-18 transferred on Fashion-MNIST, classes 0-4 -> 5-9.

The zoo's ``resnet18`` (torchvision's ResNet-18 with a 3x3 stride-1 stem for
28x28 images, one input channel) is pretrained once on classes 0-4 (recipe
``fashion-resnet18-pretrain``: 1,000 images per class, 3 epochs, seed 0, 2%
held out; no ImageNet weights exist here). It is then trained on classes 5-9
with 100 labelled images per class (2% of the training images held out for
validation) by each variant of recipe ``transfer-fashion-resnet18`` (frozen
backbone and new head, full fine-tune, from scratch), same optimizer and
epochs; each seed draws its own labelled subset and runs all the variants.
Test: the 5,000 test images of classes 5-9. This is the small-CNN table of
``bench_transfer.py`` for a real torchvision backbone.

    python benchmarks/bench_transfer_resnet.py            # full (about 30 minutes on 2 cores)
    python benchmarks/bench_transfer_resnet.py --quick    # smoke test, 64 samples, 1 epoch
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from _common import parse_args, publish, spread
from bench_transfer import markdown as transfer_markdown

from adaptnet.recipes import compare_variants, load_recipe, pretrain

RECIPE = "transfer-fashion-resnet18"
VARIANTS = {
    "frozen backbone, new head": {"transfer.mode": "frozen"},
    "full fine-tune": {"transfer.mode": "finetune"},
    "from scratch": {"transfer.mode": "scratch"},
}


def run(seeds: list[int], limit: int | None, quick: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, recipe = load_recipe(RECIPE, quick)
        budget = recipe.args("data")["train_per_class"]
        backbone = pretrain(recipe.transfer, root, limit)
        source = json.loads((backbone / "results.json").read_text())
        rows = []
        for seed in seeds:
            overrides = [*quick, f"seed={seed}", f"data.seed={seed}",
                         f"transfer.backbone={backbone}"]
            for r in compare_variants(RECIPE, VARIANTS, overrides, root / str(seed), limit=limit):
                rows.append({"seed": seed, **r})
    summary = []
    for label in VARIANTS:
        mine = [r for r in rows if r["variant"] == label]
        summary.append({"budget": budget, "variant": label,
                        "trainable": mine[0]["trainable_params"],
                        "unique": mine[0]["unique_params"],
                        **spread([r["value"] for r in mine]),
                        "train_seconds": statistics.median(r["train_seconds"] for r in mine)})
    return {"seeds": seeds, "source_test_accuracy": source["test"]["accuracy"],
            "source_train_seconds": source["train_seconds"], "summary": summary, "runs": rows}


def markdown(result: dict) -> str:
    return transfer_markdown(result, "torchvision ResNet-18 (3x3 stem)")


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        result = run([0], 64, ["train.epochs=1", "data.train_per_class=5"])
    else:
        result = run([0, 1, 2], None, [])
    publish("transfer_resnet", args, result, markdown)


if __name__ == "__main__":
    main()
