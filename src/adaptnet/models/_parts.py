"""Small pieces the zoo's models share: sequence inputs, pooled heads, reading out results."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.dynamic import DepthResult, MoEResult

__all__ = ["Classifier", "MeanPool", "PoolHead", "SequenceInput", "readout"]


class Classifier(nn.Linear):
    """``nn.Linear`` for a handful of classes, computed as ``(W @ x.T + b).T``.

    With many features and few outputs (1,280 to 10 in the demo) ``x @ W.T`` is a
    skinny product that the CPU BLAS runs slower than its transpose, and slower at 2
    threads than at 1: a 256-row head took 96 µs against 33 µs at 2 threads, 81
    against 61 µs at 1 (BENCHMARKS section 0). Same parameters and state dict as
    ``nn.Linear``; the result is the transposed view of the product (not
    contiguous), equal to ``nn.Linear``'s up to rounding. Inputs other than
    ``(B, in_features)`` go through ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x)
        if self.bias is None:
            return (self.weight @ x.t()).t()
        return torch.addmm(self.bias.unsqueeze(1), self.weight, x.t()).t()


class SequenceInput(nn.Module):
    """Token ids ``(B, T)`` (with ``vocab_size``) or values ``(B, T[, F])`` to ``(B, T, d)``.

    Embeds each position (an ``Embedding`` of tokens, or a ``Linear`` of
    ``in_features`` values), adds a learned position embedding, and projects
    from ``embed_size`` to ``d_model`` when they differ (ALBERT's factorised
    embedding).
    """

    def __init__(self, d_model: int, max_len: int, *, vocab_size: int | None = None,
                 in_features: int = 1, embed_size: int | None = None) -> None:
        super().__init__()
        e = embed_size or d_model
        self.tokens = vocab_size is not None
        self.embed = nn.Embedding(vocab_size, e) if vocab_size is not None else \
            nn.Linear(in_features, e)
        self.position = nn.Embedding(max_len, e)
        self.project = nn.Linear(e, d_model) if e != d_model else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T[, F]) -> (B, T, d)
        if not self.tokens and x.dim() == 2:
            x = x.unsqueeze(-1)
        h = self.embed(x) + self.position.weight[: x.shape[1]]
        return self.project(h)


class PoolHead(nn.Module):
    """Mean over positions, then a linear layer: ``(b, T, d) -> (b, out)``; ``(b, d)`` as is."""

    def __init__(self, d_model: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, out_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.mean(1) if h.dim() == 3 else h)


class MeanPool(nn.Module):
    """Average pooling to ``bins`` per side of the last ``dims`` dimensions.

    When ``bins`` divides a side it reshapes and takes the mean, a fraction of
    the cost of ``AdaptiveAvgPool``'s kernel on small maps (which cost more than
    a conv stage in an exit head); otherwise it falls back to adaptive pooling.
    """

    def __init__(self, bins: int, dims: int = 1) -> None:
        super().__init__()
        self.bins, self.dims = bins, dims

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        sides = h.shape[-self.dims:]
        if all(side == self.bins for side in sides):
            return h  # one position per bin: nothing to average
        if any(side % self.bins for side in sides):
            pool = F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d
            return pool(h, self.bins)
        if self.dims == 1:
            return h.unflatten(-1, (self.bins, sides[0] // self.bins)).mean(-1)
        H, W = sides
        h = h.unflatten(-1, (self.bins, W // self.bins)).unflatten(-3, (self.bins, H // self.bins))
        return h.mean((-3, -1))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, dims={self.dims}"


def readout(result: DepthResult | MoEResult, head: nn.Module) -> DepthResult | MoEResult:
    """The dynamic result with ``head`` applied to its output (and to PonderNet's step states).

    ``DepthResult``/``MoEResult`` carry states; the trainer wants predictions,
    so the head maps ``output`` and, where present, every step's state (for
    PonderNet's expected loss).
    """
    changes = {"output": head(result.output)}
    states = result.step_states if isinstance(result, DepthResult) else None
    if states is not None:  # (B, N, ...) -> (B, N, out)
        changes["step_states"] = head(states.flatten(0, 1)).unflatten(0, states.shape[:2])
    return dataclasses.replace(result, **changes)
