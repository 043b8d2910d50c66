"""The ``transfer:`` section of a recipe: start from a pretrained backbone.

A transfer recipe's ``model`` names the backbone's builder; the model is
built with the backbone's arguments and the target data's ``num_classes``.
Images of another size or channel count go through
:func:`adaptnet.transfer.adapt_input`. Then, by ``mode``:

- ``frozen``: the pretrained weights, a new head, and every block but the
  last ``trainable_blocks`` frozen (gradual unfreezing with ``unfreeze_every``);
- ``finetune``: the pretrained weights, a new head, everything trains;
- ``scratch``: the same architecture, randomly initialised (the baseline).

Pretrained blocks that train learn at ``backbone_lr`` times ``train.lr``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adaptnet.data import DataSplits
from adaptnet.errors import RecipeError
from adaptnet.transfer import GradualUnfreeze, adapt_input, blocks, freeze_blocks

__all__ = ["TransferSpec", "adapt", "freeze_for", "target_args", "training_plan"]

IMAGE_ARGS = ("in_channels", "image_size")


class TransferSpec(BaseModel):
    """A recipe's ``transfer:`` section.

    Attributes:
        backbone: a run directory, or a recipe (file or shipped name) that is
            trained first, once, into ``<runs>/backbones/<recipe>-<hash>``.
        mode: ``frozen``, ``finetune`` or ``scratch`` (see the module).
        trainable_blocks: ``frozen`` mode: how many blocks, from the output,
            train (1: the new head only).
        unfreeze_every: ``frozen`` mode: unfreeze one more block every this
            many epochs (gradual unfreezing).
        backbone_lr: learning-rate factor of the pretrained blocks that train.
        batchnorm: BatchNorm in frozen blocks: ``frozen`` (fixed statistics) or
            ``train`` (statistics keep updating).
    """

    model_config = ConfigDict(extra="forbid")
    backbone: str
    mode: Literal["frozen", "finetune", "scratch"] = "frozen"
    trainable_blocks: int = Field(1, ge=1)
    unfreeze_every: int | None = Field(None, ge=1)
    backbone_lr: float = Field(1.0, gt=0)
    batchnorm: Literal["frozen", "train"] = "frozen"


def target_args(model: str, given: dict[str, Any], backbone: str, backbone_model: str,
                backbone_args: dict[str, Any], data: DataSplits) -> dict[str, Any]:
    """The backbone's builder arguments with the target's ``num_classes``.

    Raises:
        RecipeError: the recipe's model is not the backbone's, or sets an
            argument to another value than the backbone was built with.
    """
    if data.num_classes is None:
        raise RecipeError(f"transfer needs a classification dataset; {data.name!r} has no "
                          "classes.")
    if model != backbone_model:
        raise RecipeError(f"transfer.backbone {backbone!r} is a {backbone_model}, but "
                          f"model.name is {model!r}; name the backbone's builder.")
    clash = [f"model.{k}={v!r} (the backbone has {backbone_args.get(k)!r})"
             for k, v in given.items() if k != "num_classes" and backbone_args.get(k) != v]
    if clash:
        raise RecipeError(f"transfer.backbone {backbone!r} was built differently: "
                          f"{', '.join(clash)}; drop these from model: (they come from the "
                          "backbone).")
    return {**backbone_args, "num_classes": data.num_classes}


def adapt(model: nn.Module, args: dict[str, Any], data: DataSplits) -> nn.Module:
    """``model`` behind an input adapter when the data's images differ from the backbone's."""
    if len(data.input_shape) != 3 or not all(k in args for k in IMAGE_ARGS):
        return model
    channels, size = args["in_channels"], args["image_size"]
    if data.input_shape == (channels, size, size):
        return model
    return adapt_input(model, channels, size)


def freeze_for(model: nn.Module, spec: TransferSpec) -> None:
    """Freeze the blocks ``frozen`` mode leaves out of training."""
    if spec.mode == "frozen":
        freeze_blocks(model, spec.trainable_blocks, batchnorm=spec.batchnorm)


def training_plan(model: nn.Module, spec: TransferSpec) -> tuple[GradualUnfreeze | None,
                                                                   dict[str, float]]:
    """The unfreezing schedule (or None) and the ``lr_scale`` of the pretrained blocks."""
    if spec.mode == "scratch":
        return None, {}
    schedule = None
    if spec.mode == "frozen" and spec.unfreeze_every:
        schedule = GradualUnfreeze(model, start=spec.trainable_blocks, every=spec.unfreeze_every,
                                   batchnorm=spec.batchnorm)
    scale = {} if spec.backbone_lr == 1.0 else {b: spec.backbone_lr for b in blocks(model)[:-1]}
    return schedule, scale
