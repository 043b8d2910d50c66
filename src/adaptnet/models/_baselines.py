"""The MNIST-1D baselines (Greydanus 2020, the ``mnist1d`` repository's models), rewritten."""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["cnn1d", "gru_classifier", "logreg", "mlp"]


def logreg(in_features: int = 40, num_classes: int = 10) -> nn.Linear:
    """Logistic regression: one ``Linear`` layer (cross-entropy on its logits).

    Example:
        >>> from adaptnet.models import logreg
        >>> logreg(in_features=40, num_classes=10)
        Linear(in_features=40, out_features=10, bias=True)
    """
    return nn.Linear(in_features, num_classes)


def mlp(in_features: int = 40, num_classes: int = 10, hidden: int = 100, layers: int = 3
        ) -> nn.Sequential:
    """A ReLU MLP with ``layers`` linear layers (the MNIST-1D baseline: 3 layers of width 100).

    Example:
        >>> import torch
        >>> from adaptnet.models import mlp
        >>> mlp(in_features=40, num_classes=10)(torch.randn(3, 40)).shape
        torch.Size([3, 10])
    """
    widths = [in_features] + [hidden] * (layers - 1)
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(widths[-1], num_classes))


class _Channel(nn.Module):
    """``(B, L)`` signals to ``(B, 1, L)`` for ``Conv1d``; ``(B, C, L)`` passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 2 else x


def cnn1d(num_classes: int = 10, channels: int = 25, length: int = 40, in_channels: int = 1
          ) -> nn.Sequential:
    """The MNIST-1D CNN: three strided ``Conv1d`` (kernels 5, 3, 3; stride 2), a linear classifier.

    Input ``(B, length)`` or ``(B, in_channels, length)``.

    Example:
        >>> import torch
        >>> from adaptnet.models import cnn1d
        >>> cnn1d()(torch.randn(4, 40)).shape  # MNIST-1D signals
        torch.Size([4, 10])
    """
    out = length
    for k in (5, 3, 3):
        out = (out + 2 - k) // 2 + 1
    return nn.Sequential(
        _Channel(), nn.Conv1d(in_channels, channels, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(channels * out, num_classes))


class GRUClassifier(nn.Module):
    """A (bidirectional) GRU over a scalar sequence; a linear classifier on all its outputs."""

    def __init__(self, num_classes: int, hidden: int, length: int, bidirectional: bool) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=bidirectional)
        self.linear = nn.Linear(hidden * length * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, num_classes)
        h, _ = self.gru(x.unsqueeze(-1))  # (B, L, H * directions)
        return self.linear(h.flatten(1))


def gru_classifier(num_classes: int = 10, hidden: int = 6, length: int = 40,
                   bidirectional: bool = True) -> GRUClassifier:
    """The MNIST-1D GRU baseline: bidirectional, 6 hidden units, classifier on every step.

    Example:
        >>> import torch
        >>> from adaptnet.models import gru_classifier
        >>> gru_classifier()(torch.randn(3, 40)).shape
        torch.Size([3, 10])
    """
    return GRUClassifier(num_classes, hidden, length, bidirectional)
