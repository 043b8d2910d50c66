"""Freezing by depth: blocks, FrozenBatchNorm, gradual unfreezing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet._tree import get_module, set_module, walk
from adaptnet.errors import ModelError
from adaptnet.sharing import FreezeReport, freeze, unfreeze

__all__ = ["BatchNormMode", "FrozenBatchNorm", "GradualUnfreeze", "blocks", "freeze_blocks"]

BatchNormMode = Literal["frozen", "train"]
_BATCHNORM_MODES = ("frozen", "train")


class FrozenBatchNorm(nn.Module):
    """A BatchNorm layer with fixed statistics and affine terms.

    It always normalises with the running statistics, in ``train()`` mode as
    in ``eval()``, and never updates them: a frozen backbone then behaves the
    same while a new head trains on a small dataset as it did when it was
    pretrained. It holds the *same* tensors as the BatchNorm it replaces (ties
    and optimizer references survive), under the same ``state_dict`` names, so
    a checkpoint loads into either. :meth:`unfrozen` gives the BatchNorm back.

    Works for ``BatchNorm1d/2d/3d`` inputs ``(N, C, *)``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptnet.transfer import FrozenBatchNorm
        >>> bn = FrozenBatchNorm(nn.BatchNorm2d(3))  # the running statistics, fixed
        >>> x = torch.randn(2, 3, 4, 4)
        >>> # training mode updates and uses no batch statistics
        >>> torch.equal(bn.train()(x), bn.eval()(x))
        True
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ModelError(f"FrozenBatchNorm: {type(bn).__name__} was built with "
                             "track_running_stats=False and has no statistics to freeze.")
        self.original = type(bn)
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias  # the same Parameters (or None)
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, *) -> same
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def unfrozen(self) -> nn.modules.batchnorm._BatchNorm:
        """The BatchNorm of the original class, holding these same tensors."""
        bn = self.original(self.num_features, eps=self.eps, momentum=self.momentum,
                           affine=self.weight is not None, device="meta")
        bn._parameters.update(weight=self.weight, bias=self.bias)
        bn._buffers.update(running_mean=self.running_mean, running_var=self.running_var,
                           num_batches_tracked=self.num_batches_tracked)
        return bn.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def blocks(model: nn.Module) -> list[str]:
    """The model's blocks, in order: what "freeze all but the last N blocks" counts.

    The blocks are the direct children that hold parameters, after any
    parameters held directly (a class token, say); a lone child holding them
    all (a wrapper such as ``adapt_input``'s) is looked through.
    For a torchvision ResNet they are ``conv1, bn1, layer1 .. layer4, fc``; for
    the zoo's ``small_cnn``, its two convolutions and three linear layers.

    Example:
        >>> import torch.nn as nn, adaptnet.transfer as T
        >>> T.blocks(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ['0', '2']
    """
    prefix = body_prefix(model)
    module = get_module(model, prefix.rstrip("."))
    direct = [name for name, _ in module.named_parameters(recurse=False)]
    held = [name for name, child in module._modules.items()  # shared modules at each path
            if child is not None and any(True for _ in child.parameters())]
    return [prefix + name for name in direct + held]


def body_prefix(model: nn.Module) -> str:
    """``""``, or the path (with a trailing dot) of the lone child holding all parameters."""
    prefix, module = "", model
    while not any(True for _ in module.parameters(recurse=False)):
        held = [(name, child) for name, child in module.named_children()
                if any(True for _ in child.parameters())]
        if len(held) != 1:
            break
        name, module = held[0]
        prefix = f"{prefix}{name}."
    return prefix


def freeze_blocks(model: nn.Module, trainable: int, *, batchnorm: BatchNormMode = "frozen"
                  ) -> FreezeReport:
    """Freeze all but the last ``trainable`` :func:`blocks`; make those trainable.

    The state is set, not toggled, so calling it again with a larger
    ``trainable`` unfreezes more (see :class:`GradualUnfreeze`). A tensor tied
    across a frozen and a trainable block is frozen: the report's
    ``collateral`` names the trainable-block paths that froze with it.

    Args:
        trainable: how many blocks, counted from the output (the head is
            one), stay trainable; 0 freezes everything.
        batchnorm: BatchNorm layers in frozen blocks become :class:`FrozenBatchNorm`
            (``"frozen"``: running statistics fixed and used in training too),
            or stay BatchNorm (``"train"``: PyTorch's behaviour when only
            ``requires_grad`` is cleared, so their running statistics keep
            moving in ``train()`` mode). Trainable blocks always get BatchNorm.

    Returns:
        The :class:`adaptnet.sharing.FreezeReport` of the frozen blocks.

    Raises:
        ModelError: ``trainable`` is negative, or ``batchnorm`` is unknown.

    Example:
        >>> import torch.nn as nn, adaptnet.transfer as T
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> T.freeze_blocks(net, 1).changed
        ('0.weight', '0.bias')
    """
    if batchnorm not in _BATCHNORM_MODES:
        raise ModelError(f"freeze_blocks(): batchnorm={batchnorm!r}; expected 'frozen' (fixed "
                         "running statistics) or 'train' (statistics keep updating).")
    if isinstance(trainable, bool) or not isinstance(trainable, int) or trainable < 0:
        raise ModelError(f"freeze_blocks(): trainable={trainable!r}; expected a block count "
                         ">= 0 (1 trains the head only).")
    names = blocks(model)
    cut = max(len(names) - trainable, 0)
    frozen, live = names[:cut], names[cut:]
    _swap_batchnorm(model, frozen, live, batchnorm == "frozen")
    if live:
        unfreeze(model, live)
    return freeze(model, frozen) if frozen else FreezeReport(False, (), (), ())


def _swap_batchnorm(model: nn.Module, frozen: list[str], live: list[str], freeze_bn: bool
                    ) -> None:
    """FrozenBatchNorm in frozen blocks (if ``freeze_bn``), BatchNorm elsewhere.

    Decided per module, not per path: a BatchNorm shared by a frozen and a
    trainable block has frozen tensors, so it is frozen at every path.
    """
    def under(roots: list[str]) -> dict[int, nn.Module]:
        return {id(m): m for path, m in walk(model)
                if any(path == r or path.startswith(r + ".") for r in roots)}

    in_frozen = under(frozen)
    swap: dict[int, nn.Module] = {}
    for key, m in in_frozen.items():
        if freeze_bn and isinstance(m, nn.modules.batchnorm._BatchNorm) \
                and m.track_running_stats:
            swap[key] = FrozenBatchNorm(m)
    for key, m in {**under(live), **in_frozen}.items():
        if isinstance(m, FrozenBatchNorm) and not (freeze_bn and key in in_frozen):
            swap[key] = m.unfrozen()
    for path, m in list(walk(model)):
        if id(m) in swap:
            set_module(model, path, swap[id(m)])


@dataclass
class GradualUnfreeze:
    """Gradual unfreezing (Howard & Ruder 2018, ULMFiT): one more block every ``every`` epochs.

    Epoch ``e`` trains the last ``start + e // every`` blocks. Pass it to
    :func:`adaptnet.fit` as ``epoch_start``; it depends on the epoch only, so a
    resumed run repeats it exactly.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> from adaptnet.transfer import GradualUnfreeze
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> _ = adaptnet.fit(net, (x, y), loss="cross_entropy", epochs=2,
        ...                  epoch_start=GradualUnfreeze(net, start=1, every=1))
        >>> net[0].weight.requires_grad
        True
    """

    model: nn.Module
    start: int = 1
    every: int = 1
    batchnorm: BatchNormMode = "frozen"

    def __post_init__(self) -> None:
        if self.start < 0 or self.every < 1:
            raise ModelError(f"GradualUnfreeze: start={self.start}, every={self.every}; "
                             "expected start >= 0 and every >= 1.")

    def trainable(self, epoch: int) -> int:
        return self.start + epoch // self.every

    def __call__(self, epoch: int) -> FreezeReport:
        return freeze_blocks(self.model, self.trainable(epoch), batchnorm=self.batchnorm)
