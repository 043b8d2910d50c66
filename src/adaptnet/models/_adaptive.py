"""Adaptive architectures: early-exit CNN, PonderNet/ACT GRU, MoE MLP, adaptive-depth MLP."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adaptnet.dynamic import (
    ACTHalting,
    AdaptiveDepth,
    DepthResult,
    EarlyExit,
    ExitResult,
    MoE,
    MoEResult,
    PonderNetHalting,
    ThresholdHalting,
)
from adaptnet.errors import ModelError
from adaptnet.models._baselines import _Channel
from adaptnet.models._parts import Classifier, MeanPool, readout
from adaptnet.sharing import share

__all__ = ["EarlyExitCNN", "PonderGRU", "adaptive_depth_mlp", "early_exit_cnn", "moe_mlp",
           "pondernet_gru", "sdn_resnet"]


class _Residual(nn.Module):
    """``h + relu(conv(h))``: a stage that keeps its input's shape, so stages can be shared."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.relu(self.layer(h))


class EarlyExitCNN(nn.Module):
    """A stem, then ``EarlyExit`` over residual conv stages with a pooled classifier after each.

    Example:
        >>> from adaptnet.models import EarlyExitCNN, early_exit_cnn
        >>> isinstance(early_exit_cnn(), EarlyExitCNN)  # built by early_exit_cnn()
        True
    """

    def __init__(self, stem: nn.Module, exits: EarlyExit) -> None:
        super().__init__()
        self.stem = stem
        self.exits = exits

    def forward(self, x: torch.Tensor) -> ExitResult:  # (B, C, L) or (B, C, H, W)
        return self.exits(self.stem(x))


def early_exit_cnn(in_channels: int = 1, num_classes: int = 10, dims: int = 1,
                   channels: int = 32, stages: int = 3, share_stages: bool = False,
                   exits: bool = True, threshold: float = 0.9, pool: int = 4,
                   exit_weights: list[float] | None = None,
                   capacity: float | None = None) -> nn.Module:
    """A BranchyNet-style CNN (Teerapittayanon et al. 2016) for 1-D signals or 2-D images.

    A strided stem conv, then ``stages`` residual 3-wide convs at one
    resolution, each followed by an exit: adaptive average pooling to ``pool``
    (per side) and a linear classifier. In evaluation a sample leaves at the
    first exit whose top softmax probability reaches ``threshold``.

    Args:
        dims: 1 for ``(B, L)``/``(B, C, L)`` signals, 2 for ``(B, C, H, W)`` images.
        share_stages: one set of stage weights applied ``stages`` times.
        exits: ``False`` builds the same network without early exits (a plain
            ``nn.Sequential`` ending in the last classifier): the static baseline.
        pool: bins per side of each exit's average pooling, done by reshape and
            mean when they divide the side (a pool as long as the side keeps
            every position: the classifier reads the whole map).
        exit_weights: joint-loss weight of each exit (default 1 each).
        capacity: :class:`~adaptnet.EarlyExit` capacity mode: the share of rows
            that go on at each exit (``threshold`` then does not apply).

    Example:
        >>> import torch
        >>> from adaptnet.models import early_exit_cnn
        >>> net = early_exit_cnn(num_classes=3, channels=8).eval()  # 1-D signals (B, L)
        >>> r = net(torch.randn(4, 40))
        >>> r.output.shape, r.exit_index.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """
    if dims not in (1, 2):
        raise ModelError(f"early_exit_cnn: dims must be 1 (signals) or 2 (images), got {dims}.")
    if stages < 1:
        raise ModelError(f"early_exit_cnn: stages must be >= 1, got {stages}.")
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    stem = nn.Sequential(*([_Channel()] if dims == 1 else []),
                         conv(in_channels, channels, 5, stride=2, padding=2), nn.ReLU())
    blocks = [_Residual(conv(channels, channels, 3, padding=1)) for _ in range(stages)]
    if pool < 1:
        raise ModelError(f"early_exit_cnn: pool must be >= 1 (bins per side), got {pool}.")
    heads = [nn.Sequential(MeanPool(pool, dims), nn.Flatten(),
                           Classifier(channels * pool ** dims, num_classes))
             for _ in range(stages if exits else 1)]
    if not exits:
        net = nn.Sequential(stem, *blocks, heads[0])
        if share_stages and stages > 1:
            share(net, [str(i) for i in range(1, stages + 1)])
        return net
    model = EarlyExitCNN(stem, EarlyExit(blocks, heads, weights=exit_weights,
                                         threshold=None if capacity else threshold,
                                         capacity=capacity))
    if share_stages and stages > 1:
        share(model, "exits.stages")
    return model


class _BasicBlock(nn.Module):
    """He et al.'s basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def sdn_resnet(in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
               blocks: int = 3, exits: bool = True, threshold: float = 0.9, pool: int = 4,
               capacity: float | None = None) -> nn.Module:
    """A ResNet for small images (He et al. 2016, sec. 4.2) with an exit after every block.

    A 3×3 stem, then ``len(widths)`` stages of ``blocks`` basic blocks, each
    stage after the first halving the resolution (``widths=(16, 32, 64)``,
    ``blocks=3``: ResNet-20). As in Shallow-Deep Networks (Kaya et al. 2019)
    each block but the last is followed by an internal classifier (average
    pooling to ``pool`` bins per side, a linear layer) and the last by the
    ResNet's own head (global average pooling, a linear layer). The joint loss
    weights exit ``i`` of ``L`` by ``i / L``, SDN's final weights, so the
    deep exits, which decide accuracy, are not outweighed by the shallow ones.
    In evaluation a sample leaves at the first exit whose top softmax
    probability reaches ``threshold``.

    Args:
        exits: ``False`` builds the same network without internal classifiers
            (a plain ``nn.Sequential``): the static baseline.
        capacity: :class:`~adaptnet.EarlyExit` capacity mode instead of ``threshold``.

    Example:
        >>> import torch
        >>> from adaptnet.models import sdn_resnet
        >>> net = sdn_resnet(num_classes=10, widths=(8, 16), blocks=1).eval()
        >>> net(torch.randn(2, 1, 28, 28)).exit_index.shape
        torch.Size([2])
    """
    if not widths or blocks < 1 or min(widths) < 1 or pool < 1:
        raise ModelError(f"sdn_resnet: widths must be positive channel counts and blocks and "
                         f"pool >= 1, got widths={widths}, blocks={blocks}, pool={pool}.")
    stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                         nn.BatchNorm2d(widths[0]), nn.ReLU())
    layers, cin = [], widths[0]
    for i, width in enumerate(widths):
        for j in range(blocks):
            layers.append(_BasicBlock(cin, width, 2 if i and not j else 1))
            cin = width
    final = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    if not exits:
        return nn.Sequential(stem, *layers, final)
    heads = [nn.Sequential(MeanPool(pool, 2), nn.Flatten(),
                           nn.Linear(block.conv2.out_channels * pool ** 2, num_classes))
             for block in layers[:-1]]
    n = len(layers)
    return EarlyExitCNN(stem, EarlyExit(layers, [*heads, final],
                                        weights=[(i + 1) / n for i in range(n)],
                                        threshold=None if capacity else threshold,
                                        capacity=capacity))


class _GRUStep(nn.Module):
    """One ponder step on the state ``[x, h]``: ``h = GRUCell(x, h)``; ``x`` is carried along."""

    def __init__(self, cell: nn.GRUCell, bits: int) -> None:
        super().__init__()
        self.cell, self.bits = cell, bits

    def forward(self, state: torch.Tensor) -> torch.Tensor:  # (b, bits + H)
        x, h = state[:, :self.bits], state[:, self.bits:]
        return torch.cat([x, self.cell(x, h)], 1)


class _Hidden(nn.Module):
    """The hidden part ``h`` of a ``[x, h]`` state, through a linear layer."""

    def __init__(self, bits: int, hidden: int, out: int) -> None:
        super().__init__()
        self.bits = bits
        self.linear = nn.Linear(hidden, out)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.linear(state[..., self.bits:])


class PonderGRU(nn.Module):
    """A GRU cell applied to one input until it halts (PonderNet or ACT); a classifier on ``h``.

    Example:
        >>> from adaptnet.models import PonderGRU, pondernet_gru
        >>> isinstance(pondernet_gru(), PonderGRU)  # built by pondernet_gru()
        True
    """

    def __init__(self, bits: int, hidden: int, num_classes: int, max_steps: int,
                 halting: nn.Module, capacity: float | None = None) -> None:
        super().__init__()
        self.bits, self.hidden = bits, hidden
        self.depth = AdaptiveDepth(_GRUStep(nn.GRUCell(bits, hidden), bits), halting, max_steps,
                                   capacity=capacity)
        self.out = _Hidden(bits, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> DepthResult:  # (B, bits) -> logits in .output
        state = torch.cat([x, x.new_zeros(x.shape[0], self.hidden)], 1)
        return readout(self.depth(state), self.out)


def pondernet_gru(bits: int = 8, hidden: int = 64, num_classes: int = 2, max_steps: int = 20,
                  halting: str = "pondernet", lambda_p: float = 0.2, beta: float = 0.01,
                  time_penalty: float = 0.01) -> PonderGRU:
    """PonderNet's parity model (Banino et al. 2021): a GRU cell pondering each input.

    Args:
        halting: ``"pondernet"`` (geometric prior ``lambda_p``, KL weight ``beta``),
            ``"act"`` (Graves 2016, ``time_penalty``), or ``"none"``: every sample
            runs all ``max_steps`` (the full-depth baseline).

    Example:
        >>> import torch
        >>> from adaptnet.models import pondernet_gru
        >>> r = pondernet_gru(bits=8, hidden=16, max_steps=5).eval()(torch.randn(4, 8))
        >>> r.output.shape, bool((r.steps <= 5).all())
        (torch.Size([4, 2]), True)
    """
    head = _Hidden(bits, hidden, 1)
    capacity = None
    if halting == "pondernet":
        policy: nn.Module = PonderNetHalting(head, lambda_p=lambda_p, beta=beta)
    elif halting == "act":
        policy = ACTHalting(head, time_penalty=time_penalty)
    elif halting == "none":  # capacity 1: every row goes on at every step
        policy, capacity = ThresholdHalting(head), 1.0
    else:
        raise ModelError(f"pondernet_gru: halting must be 'pondernet', 'act' or 'none', got "
                         f"{halting!r}.")
    return PonderGRU(bits, hidden, num_classes, max_steps, policy, capacity)


class _Readout(nn.Module):
    """stem -> dynamic body -> head, returning the body's result with predictions as ``output``."""

    def __init__(self, stem: nn.Module, body: nn.Module, head: nn.Module, residual: bool) -> None:
        super().__init__()
        self.stem, self.body, self.head, self.residual = stem, body, head, residual

    def forward(self, x: torch.Tensor) -> DepthResult | MoEResult:
        h = self.stem(x)
        result = self.body(h)
        if self.residual:  # MoE: h + experts(h), the residual its dropped tokens rely on
            result = dataclasses.replace(result, output=h + result.output)
        return readout(result, self.head)


def moe_mlp(in_features: int = 64, num_classes: int = 10, hidden: int = 64, experts: int = 4,
            k: int = 1, expert_hidden: int = 128, capacity_factor: float | None = None,
            balance_weight: float = 0.01) -> nn.Module:
    """An MLP whose middle layer is a top-``k`` mixture of ``experts`` two-layer MLPs (residual).

    Example:
        >>> import torch
        >>> from adaptnet.models import moe_mlp
        >>> r = moe_mlp(in_features=16, num_classes=3, experts=4, k=2)(torch.randn(5, 16))
        >>> r.output.shape, r.experts.shape
        (torch.Size([5, 3]), torch.Size([5, 2]))
    """
    stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
    body = MoE([nn.Sequential(nn.Linear(hidden, expert_hidden), nn.ReLU(),
                              nn.Linear(expert_hidden, hidden)) for _ in range(experts)],
               nn.Linear(hidden, experts), k=k, capacity_factor=capacity_factor,
               balance_weight=balance_weight)
    return _Readout(stem, body, nn.Linear(hidden, num_classes), residual=True)


def adaptive_depth_mlp(in_features: int = 64, num_classes: int = 10, hidden: int = 64,
                       max_steps: int = 6, time_penalty: float = 0.01,
                       halting: str = "act") -> nn.Module:
    """An MLP whose one shared residual block repeats per sample until ACT halts it.

    ``halting="none"`` runs every sample for all ``max_steps`` (the full-depth
    baseline: the same weight-tied residual MLP without halting).

    Example:
        >>> import torch
        >>> from adaptnet.models import adaptive_depth_mlp
        >>> net = adaptive_depth_mlp(in_features=16, num_classes=3, max_steps=4).eval()
        >>> r = net(torch.randn(5, 16))
        >>> r.output.shape, r.steps.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """
    if halting not in ("act", "none"):
        raise ModelError(f"adaptive_depth_mlp: halting must be 'act' or 'none', got "
                         f"{halting!r}.")
    stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
    policy = ACTHalting(nn.Linear(hidden, 1), time_penalty=time_penalty) if halting == "act" \
        else ThresholdHalting(nn.Linear(hidden, 1))
    body = AdaptiveDepth(_Residual(nn.Linear(hidden, hidden)), policy, max_steps,
                         capacity=None if halting == "act" else 1.0)
    return _Readout(stem, body, nn.Linear(hidden, num_classes), residual=False)
