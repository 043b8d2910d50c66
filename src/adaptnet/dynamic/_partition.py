"""The partition steps every dynamic construct shares.

Exact mode shrinks an *active set* of rows: after each decision one
``nonzero`` gives the rows that go on, and only they are gathered for the
next step (the constructs write that ``nonzero`` in their per-step method, so
that under ``torch.compile`` it is the step's one graph break). Capacity
mode keeps shapes static: a fixed number of rows goes on, chosen by score
with ``topk``, so ``torch.compile(fullgraph=True)`` and ``torch.export`` take
the whole loop and a GPU never waits on the host.

Results are written in place into preallocated ``(B, ...)`` outputs with
``index_copy_`` (autograd follows it): a construct writes each active row's
value at every step and later steps overwrite the rows that went on, so no
final merge, concatenation or inverse permutation is needed.
"""

from __future__ import annotations

import math

import torch

from adaptnet.errors import DynamicError


def write_rows(out: torch.Tensor | None, ids: torch.Tensor | None, values: torch.Tensor,
               batch: int) -> torch.Tensor:
    """Write ``values`` (one row per active row) into rows ``ids`` of ``out``; return ``out``.

    ``ids`` None means every row, in order. ``out`` None allocates the
    ``(batch, *values.shape[1:])`` output on the first write.
    """
    if out is None:
        out = values.new_empty((batch, *values.shape[1:]))
    if ids is None:
        return out.copy_(values)
    return out.index_copy_(0, ids, values)


def fill_rows(out: torch.Tensor, ids: torch.Tensor | None, value: int | float) -> torch.Tensor:
    """Set rows ``ids`` (None: all) of ``out`` to ``value``, in place."""
    return out.fill_(value) if ids is None else out.index_fill_(0, ids, value)


def least(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows with the lowest scores (static shape ``(k,)``, in no particular order).

    ``torch.topk``, which ``torch.export`` and ONNX take as they are (ONNX has
    no stable sort); among rows with equal scores, which ones are chosen is
    topk's choice.
    """
    return torch.topk(scores, k, largest=False, sorted=False).indices


def top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rest)``: the ``k`` highest-scoring rows and the other ``B - k`` rows.

    Shapes ``(k,)`` and ``(B - k,)`` depend only on ``k``, never on the scores.
    """
    chosen = torch.topk(scores, k, sorted=False).indices
    others = torch.ones_like(scores).index_fill(0, chosen, 0.0)  # 1 for each row not chosen
    return chosen, torch.topk(others, scores.shape[0] - k, sorted=False).indices


def take(ids: torch.Tensor | None, rows: torch.Tensor | None, *tensors: torch.Tensor
         ) -> tuple[torch.Tensor | None, ...]:
    """The active set after keeping ``rows`` of it: ``(ids, *tensors)`` gathered.

    ``rows`` None keeps everything (no gather); ``ids`` None stands for every
    row of the batch.
    """
    if rows is None:
        return (ids, *tensors)
    return (rows if ids is None else ids.index_select(0, rows),
            *(t.index_select(0, rows) for t in tensors))


def capacity_rows(capacity: float, rows: int) -> int:
    """How many of ``rows`` go on at a decision with this capacity: ``ceil(capacity * rows)``."""
    return min(rows, math.ceil(capacity * rows))


def check_capacity(capacity: object, what: str) -> float | None:
    """``capacity`` as a float in (0, 1], or None; a DynamicError naming the fix otherwise."""
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int | float) or \
            not 0.0 < float(capacity) <= 1.0:
        raise DynamicError(
            f"{what}: capacity must be a fraction in (0, 1] (the share of rows that go on at "
            f"each decision), or None for exact mode; got {capacity!r}. E.g. capacity=0.5.")
    return float(capacity)
