"""torchvision's classifiers as zoo models (the optional ``vision`` extra)."""

from __future__ import annotations

from typing import Any

from torch import nn

from adaptnet.errors import ModelError

__all__ = ["resnet18"]


def _torchvision() -> Any:
    try:
        import torchvision.models as tvm
    except Exception as e:
        raise ModelError(f"this zoo model is torchvision's, and torchvision is not usable here "
                         f"({type(e).__name__}: {e}). Install the vision extra (pip install "
                         "'adaptnet[vision]', a torchvision matching your torch).") from None
    return tvm


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False
             ) -> nn.Module:
    """torchvision's ResNet-18, optionally adapted to small images such as 28x28 ones.

    ``small_input`` replaces the 7x7 stride-2 stem convolution by a 3x3
    stride-1 one, as ResNets for CIFAR-sized images do (He et al. 2016, sec.
    4.2), and keeps the max-pool: a 28x28 image reaches ``layer1`` at 14x14
    and ``layer4`` at 2x2 instead of 1x1. ``in_channels`` other than 3 (1 for
    Fashion-MNIST) changes the stem's input channels. Every other module is
    torchvision's own, under its own names (``conv1``, ``layer1``.., ``fc``).

    Example:
        >>> import torch
        >>> from adaptnet.models import resnet18
        >>> net = resnet18(num_classes=10, in_channels=1, small_input=True)
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    model = _torchvision().resnet18(weights=None, num_classes=num_classes)
    if small_input or in_channels != 3:
        kernel, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
