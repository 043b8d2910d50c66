"""The one protocol every dynamic construct's result implements, and that the trainer reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.utils._pytree as pytree  # how torch.export and torch.compile flatten outputs

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class DynamicResult(Protocol):
    """A dynamic module's output: its output tensor, its losses and per-sample statistics.

    Every adaptnet result implements it (``ExitResult``, ``DepthResult``,
    ``MoEResult``, ``TokenResult``, ``TokenExits``, ``DecoderResult``), and so may
    a user's own result type; ``fit`` and ``evaluate`` read nothing else.
    """

    @property
    def output(self) -> torch.Tensor:
        """``(B, ...)`` what the task loss and metrics compare with the targets."""
        ...

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """A scalar to add to the training loss (ponder cost, load balance), or None."""
        ...

    def task_loss(self, target: torch.Tensor, loss_fn: LossFn,
                  per_sample: LossFn | None = None) -> torch.Tensor:
        """The training loss for ``target``; ``per_sample`` gives one loss per row when asked."""
        ...

    def statistics(self) -> dict[str, torch.Tensor]:
        """Per-sample statistics, each ``(B, ...)``: e.g. ``steps``, ``exit_index``."""
        ...


def export_as_pytree(cls: type, static: tuple[str, ...] = ()) -> type:
    """Register a result dataclass with torch's pytree, so export and ONNX take it as output.

    ``torch.export`` and ``torch.onnx.export(dynamo=True)`` flatten a model's
    outputs; fields named in ``static`` (Python values such as loss weights) travel
    as the tree's context instead of as outputs. Used as a class decorator.
    """
    children = tuple(f.name for f in dataclasses.fields(cls) if f.name not in static)

    def flatten(result: Any) -> tuple[list, tuple]:
        return [getattr(result, k) for k in children], tuple(getattr(result, k) for k in static)

    def flatten_with_keys(result: Any) -> tuple[list, tuple]:
        return ([(pytree.GetAttrKey(k), getattr(result, k)) for k in children],
                tuple(getattr(result, k) for k in static))

    def unflatten(values: Iterable, context: tuple) -> Any:
        return cls(**dict(zip(children, values, strict=True)),
                   **dict(zip(static, context, strict=True)))

    pytree.register_pytree_node(cls, flatten, unflatten,
                                serialized_type_name=f"adaptnet.{cls.__name__}",
                                flatten_with_keys_fn=flatten_with_keys)
    return cls
