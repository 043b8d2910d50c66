"""The textbook examples of dynamic and shared networks, faithfully and small."""

from __future__ import annotations

import torch
from torch import nn

from adaptnet.dynamic import per_sample
from adaptnet.errors import ModelError
from adaptnet.sharing import tie

__all__ = [
    "AdaptiveMLP",
    "BranchNet",
    "SharedScaleNet",
    "TwoInputNet",
    "adaptive_mlp",
    "branch_net",
    "reused_layer",
    "shared_scale_net",
    "small_cnn",
    "two_input_net",
]


class BranchNet(nn.Module):
    """10 -> 50 -> 1 with a per-sample branch: the output layer reads ``h`` or ``-h``.

    Each sample takes its own path (``@per_sample``): a sample whose mean hidden
    activation exceeds ``threshold`` goes through ``out(h)``, any other through
    ``out(-h)``; both paths share the output layer. (The textbook's
    ``if relu(h).sum() > 0`` never takes its else path with a non-zero ``h``:
    there ``-h`` is ``h``. The default 0.25 splits standard-normal inputs
    roughly in half at initialisation.)

    Example:
        >>> from adaptnet.models import BranchNet, branch_net
        >>> isinstance(branch_net(), BranchNet)  # built by branch_net()
        True
    """

    def __init__(self, in_features: int = 10, hidden: int = 50, out_features: int = 1,
                 threshold: float = 0.25) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, out_features)
        self.threshold = threshold

    @per_sample
    def forward(self, x):  # one sample: (in_features,) -> (out_features,)
        h = torch.relu(self.hidden(x))
        if h.mean() > self.threshold:
            y = self.out(h)
        else:
            y = self.out(-h)
        return y

    def takes_first_path(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: which samples of ``x`` (B, in_features) take ``out(h)``."""
        return torch.relu(self.hidden(x)).mean(1) > self.threshold


def branch_net(in_features: int = 10, hidden: int = 50, out_features: int = 1,
               threshold: float = 0.25) -> BranchNet:
    """The dynamic branch network (10 -> 50 -> 1, a per-sample ``if`` around a shared layer).

    Example:
        >>> import torch
        >>> from adaptnet.models import branch_net
        >>> net = branch_net(in_features=10)
        >>> net(torch.randn(6, 10)).shape
        torch.Size([6, 1])
    """
    return BranchNet(in_features, hidden, out_features, threshold)


class TwoInputNet(nn.Module):
    """Two inputs through one shared ``Linear(features, features)``, then a joint head.

    ``forward(x)`` takes ``(B, 2, features)`` (both inputs stacked), or
    ``forward(x1, x2)`` two ``(B, features)`` tensors.

    Example:
        >>> from adaptnet.models import TwoInputNet, two_input_net
        >>> isinstance(two_input_net(), TwoInputNet)  # built by two_input_net()
        True
    """

    def __init__(self, features: int = 10, out_features: int = 1) -> None:
        super().__init__()
        self.shared = nn.Linear(features, features)
        self.head = nn.Linear(2 * features, out_features)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
        if x2 is None:
            x1, x2 = x1.unbind(1)  # (B, 2, F) -> 2 x (B, F)
        h = torch.cat([torch.relu(self.shared(x1)), torch.relu(self.shared(x2))], 1)
        return self.head(h)  # (B, out_features)


def two_input_net(features: int = 10, out_features: int = 1) -> TwoInputNet:
    """The two-input network whose inputs share one ``Linear(10, 10)`` layer.

    Example:
        >>> import torch
        >>> from adaptnet.models import two_input_net
        >>> two_input_net(features=10)(torch.randn(3, 10), torch.randn(3, 10)).shape
        torch.Size([3, 1])
    """
    return TwoInputNet(features, out_features)


class AdaptiveMLP(nn.Module):
    """An MLP whose depth adapts per sample: one shared hidden layer, applied until done.

    After the input layer, the shared residual layer is applied while the
    sample's hidden state changes by more than ``tol`` (in norm) and fewer than
    ``max_layers`` layers have run; each sample stops on its own.

    Example:
        >>> from adaptnet.models import AdaptiveMLP, adaptive_mlp
        >>> isinstance(adaptive_mlp(), AdaptiveMLP)  # built by adaptive_mlp()
        True
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, max_layers: int,
                 tol: float) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.layer = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)
        self.max_layers, self.tol = max_layers, tol

    @per_sample
    def forward(self, x):  # one sample: (in_features,) -> (num_classes,)
        h = torch.relu(self.inp(x))
        for _ in range(self.max_layers):
            step = torch.tanh(self.layer(h))
            h = h + step
            if step.norm() < self.tol:
                break
        return self.out(h)


def adaptive_mlp(in_features: int = 64, hidden: int = 64, num_classes: int = 10,
                 max_layers: int = 6, tol: float = 1.0) -> AdaptiveMLP:
    """The adaptive MLP: a shared residual layer repeated per sample until its update is small.

    Example:
        >>> import torch
        >>> from adaptnet.models import adaptive_mlp
        >>> net = adaptive_mlp(in_features=16, hidden=8, num_classes=3)
        >>> net(torch.randn(5, 16)).shape
        torch.Size([5, 3])
    """
    return AdaptiveMLP(in_features, hidden, num_classes, max_layers, tol)


def reused_layer(features: int = 8) -> nn.Sequential:
    """The ``nn.Sequential`` that applies one ``Linear(8, 8)`` twice (one weight, two uses).

    Example:
        >>> import torch, adaptnet
        >>> from adaptnet.models import reused_layer
        >>> net = reused_layer(features=8)
        >>> s = adaptnet.summary(net)  # shared weights: counted once
        >>> net(torch.randn(2, 8)).shape, s.unique < s.per_use
        (torch.Size([2, 8]), True)
    """
    layer = nn.Linear(features, features)
    return nn.Sequential(layer, nn.ReLU(), layer)


class ScaledLinear(nn.Linear):
    """``Linear`` followed by an elementwise scale vector: ``scale * (W x + b)``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.scale = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * super().forward(x)


class SharedScaleNet(nn.Module):
    """Two layers that share one scale vector (``layer2.scale`` is tied to ``layer1.scale``).

    Example:
        >>> from adaptnet.models import SharedScaleNet, shared_scale_net
        >>> isinstance(shared_scale_net(), SharedScaleNet)  # built by shared_scale_net()
        True
    """

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.layer1 = ScaledLinear(in_features, hidden)
        self.layer2 = ScaledLinear(hidden, hidden)
        self.out = nn.Linear(hidden, out_features)
        tie(self, "layer2.scale", "layer1.scale")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        return self.out(torch.relu(self.layer2(torch.relu(self.layer1(x)))))


def shared_scale_net(in_features: int = 10, hidden: int = 16, out_features: int = 1
                     ) -> SharedScaleNet:
    """Two layers sharing a scale vector (a tie between two parameters of one shape).

    Example:
        >>> import torch
        >>> from adaptnet.models import shared_scale_net
        >>> shared_scale_net()(torch.randn(3, 10)).shape
        torch.Size([3, 1])
    """
    return SharedScaleNet(in_features, hidden, out_features)


def small_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """The textbook small CNN (LeNet-5 style): two conv/pool stages and three linear layers.

    Input ``(B, in_channels, image_size, image_size)``; ``image_size >= 8``.

    Example:
        >>> import torch
        >>> from adaptnet.models import small_cnn
        >>> small_cnn()(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    side = ((image_size // 2) - 4) // 2  # conv5 pad2 keeps, pool halves, conv5 -4, pool halves
    if side < 1:
        raise ModelError(f"small_cnn: image_size must be at least 8, got {image_size}.")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes))
