"""Losses, and reading a forward pass's result: a tensor or a ``DynamicResult``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from adaptnet.dynamic import DynamicResult
from adaptnet.errors import ConfigError, DynamicError

__all__ = ["LOSSES", "LossFn", "cross_entropy", "loss", "mse", "per_sample", "statistic",
           "unpack"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not (y.is_floating_point() or y.is_complex()) and pred.dim() == y.dim() + 1:
        raise ConfigError(f"fit(): loss 'mse' got integer targets of shape {tuple(y.shape)} "
                          f"for a prediction of shape {tuple(pred.shape)}: class labels? "
                          "Use loss='cross_entropy' (recipes: train.loss=cross_entropy); for "
                          "regression, give float targets of the prediction's shape.")
    if pred.shape != y.shape:
        raise ConfigError(f"fit(): loss 'mse' got a prediction of shape {tuple(pred.shape)} "
                          f"and a target of shape {tuple(y.shape)}; they would broadcast "
                          "silently. Give the targets the prediction's shape (e.g. "
                          "y.view(-1, 1)).")
    return F.mse_loss(pred, y)


def cross_entropy(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if pred.dim() > 2:  # (B, T, V) language-model logits
        return F.cross_entropy(pred.flatten(0, -2), y.flatten())
    return F.cross_entropy(pred, y)


LOSSES: dict[str, LossFn] = {"mse": mse, "cross_entropy": cross_entropy,
                              "bce_with_logits": F.binary_cross_entropy_with_logits}


def per_sample(fn: LossFn) -> LossFn | None:
    """The built-in loss ``fn`` with one value per row (for PonderNet's expected loss), or None.

    A custom ``loss_fn`` returns one number per batch, so it has none.
    """
    if fn is cross_entropy:
        return lambda pred, y: F.cross_entropy(pred, y, reduction="none")
    if fn is mse or fn is F.binary_cross_entropy_with_logits:
        plain = F.mse_loss if fn is mse else F.binary_cross_entropy_with_logits

        def per_row(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if pred.shape != y.shape:
                raise ConfigError(f"fit(): the prediction per step has shape "
                                  f"{tuple(pred.shape[1:])} and the target "
                                  f"{tuple(y.shape[1:])}; they must match.")
            return plain(pred, y, reduction="none").flatten(1).mean(1)
        return per_row
    return None


def loss(fn: LossFn, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``fn(pred, y)``; a prediction and targets that do not fit is a ConfigError."""
    try:
        return fn(pred, y)
    except (IndexError, ValueError, RuntimeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"fit(): the loss cannot compare the model's output {tuple(pred.shape)} "
            f"{str(pred.dtype).removeprefix('torch.')} with the targets {tuple(y.shape)} "
            f"{str(y.dtype).removeprefix('torch.')} ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}). Check that the model's outputs "
            "match the data (e.g. num_classes covers every label) and the loss fits the "
            "task.") from None


def unpack(out: Any, y: torch.Tensor, fn: LossFn, training: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, Any]:
    """(task loss, auxiliary loss, prediction, the raw result) of one forward pass.

    A tensor is the prediction; anything else must implement ``DynamicResult``.
    Training uses the result's own ``task_loss`` (BranchyNet's joint loss,
    PonderNet's expected loss); evaluation compares ``output`` alone.
    """
    if isinstance(out, torch.Tensor):
        return loss(fn, out, y), None, out, out
    if not isinstance(out, DynamicResult):
        # the probe is on the user's object: a result written for the protocol's old name
        old = " (adaptnet 0.1 called `output` `prediction`: rename it)" \
            if hasattr(out, "prediction") else ""
        raise ConfigError(f"fit(): the model returned {type(out).__name__}; it must return a "
                          "tensor or a DynamicResult (output, aux_loss, task_loss, "
                          f"statistics), as adaptnet's dynamic modules do{old}.")
    pred = out.output
    if not training:
        return loss(fn, pred, y), None, pred, out
    aux = out.aux_loss
    try:
        task = loss(lambda _, target: out.task_loss(target, fn, per_sample(fn)), pred, y)
    except DynamicError as e:
        raise ConfigError(f"fit(): {e} Use a built-in loss ('cross_entropy', 'mse' or "
                          "'bce_with_logits').") from None
    return task, aux if isinstance(aux, torch.Tensor) else None, pred, out


def statistic(out: Any, name: str) -> torch.Tensor | None:
    """A per-sample statistic of a DynamicResult (``steps``, ``exit_index``), or None."""
    return out.statistics().get(name) if isinstance(out, DynamicResult) else None
