"""Input guards every dynamic construct shares: no tracing, and a batch, not one example."""

from __future__ import annotations

from typing import Any

import torch

from adaptnet.errors import DynamicError


def refuse_tracing(what: str) -> None:
    """Raise when called under ``torch.jit.trace`` (also how ONNX export traces by default).

    A trace records the operations one example batch ran, so the paths, exits
    or depths that batch took would be replayed for every later input.
    """
    if torch.jit.is_tracing():
        raise DynamicError(
            f"{what} is being traced (torch.jit.trace, or torch.onnx.export by tracing). A "
            "trace records the paths the example batch took and would replay them for every "
            "input. Deploy the eager model or torch.compile it; docs/dynamic.md lists the "
            "deployment paths that work.")


def check_batched(x: Any, what: str) -> None:
    """Refuse a non-tensor or a single unbatched example (a 0-d or 1-D tensor)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DynamicError(f"{what}: expected a batch (B, features...), got {got}. For one "
                           "example, add the batch dimension: x.unsqueeze(0).")


def check_tokens(x: Any, what: str) -> None:
    """Refuse anything but a ``(B, T, d)`` floating-point batch of token states."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DynamicError(f"{what}: expected token states (B, T, d), floating point, got "
                           f"{got}. Embed token ids first (nn.Embedding).")
