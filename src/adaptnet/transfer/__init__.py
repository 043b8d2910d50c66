"""Transfer learning: load a pretrained backbone, replace its head, freeze precisely, fine-tune.

The textbook recipe, done with adaptnet::

    model = load_backbone("resnet18")   # or a module with weights=file; runs: recipes.load_model
    replace_head(model, num_classes=5)
    freeze_blocks(model, trainable=1)               # everything but the new head
    print(adaptnet.summary(model))                  # trainable vs frozen, per module

See docs/transfer.md for a tour.
"""

from adaptnet.transfer._adapt import InputAdapter, adapt_input
from adaptnet.transfer._blocks import (
    FrozenBatchNorm,
    GradualUnfreeze,
    blocks,
    freeze_blocks,
)
from adaptnet.transfer._exits import attach_exits
from adaptnet.transfer._head import find_head, replace_head
from adaptnet.transfer._load import load_backbone, load_weights

__all__ = [
    "FrozenBatchNorm",
    "GradualUnfreeze",
    "InputAdapter",
    "adapt_input",
    "attach_exits",
    "blocks",
    "find_head",
    "freeze_blocks",
    "load_backbone",
    "load_weights",
    "replace_head",
]
