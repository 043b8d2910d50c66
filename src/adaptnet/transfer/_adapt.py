"""Feeding a backbone images of another size or channel count."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.errors import ModelError

__all__ = ["InputAdapter", "adapt_input"]


class InputAdapter(nn.Module):
    """Resize images to ``size`` and convert their channels to ``channels``; no parameters.

    Channels: 1 → C repeats the grey channel (how ImageNet backbones take
    greyscale images); C → 1 averages them; equal counts pass through. Any
    other pair is refused when the images arrive, naming both counts. Sizes:
    bilinear resampling (antialiased when shrinking).

    Example:
        >>> import torch
        >>> from adaptnet.transfer import InputAdapter
        >>> InputAdapter(3, (28, 28))(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 3, 28, 28])
    """

    def __init__(self, channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.channels, self.size = channels, tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, channels, *size)
        if x.dim() != 4:
            raise ModelError(f"InputAdapter: expected images (B, C, H, W), got shape "
                             f"{list(x.shape)}.")
        c = x.shape[1]
        if c != self.channels:
            if c == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ModelError(f"InputAdapter: cannot turn {c} channels into "
                                 f"{self.channels}; only 1 -> C (repeat) and C -> 1 (average) "
                                 "are defined.")
        if tuple(x.shape[-2:]) != self.size:
            shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=shrink)
        return x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}"


def adapt_input(model: nn.Module, channels: int, size: int | tuple[int, int]) -> nn.Sequential:
    """``model`` behind an :class:`InputAdapter`: ``Sequential(adapter=..., model=model)``.

    ``channels`` and ``size`` are what the model was built for (a backbone
    pretrained on 1×28×28 Fashion-MNIST takes 3×32×32 images this way).
    :func:`blocks`, :func:`find_head` and :func:`freeze_blocks` look through
    the wrapper.

    Example:
        >>> import torch
        >>> from adaptnet.models import build
        >>> from adaptnet.transfer import adapt_input
        >>> net = adapt_input(build("small_cnn", num_classes=5), channels=1, size=28)
        >>> net(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 5])
    """
    if isinstance(size, int):
        size = (size, size)
    if channels < 1 or len(size) != 2 or min(size) < 1:
        raise ModelError(f"adapt_input(): channels={channels}, size={size}; expected a positive "
                         "channel count and a (height, width) of positive sizes.")
    return nn.Sequential(OrderedDict(adapter=InputAdapter(channels, size), model=model))
