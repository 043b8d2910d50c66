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

import functools
from dataclasses import dataclass
from fractions import Fraction

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
    """How many of ``rows`` go on at a decision with this capacity: ``ceil(capacity * rows)``.

    Computed in integers, the capacity as the nearest fraction ``p / q`` (``q`` up
    to a million: 0.3 is 3/10): ``(p * rows + q - 1) // q``. Floats would round
    (``0.7 * 10`` is 7.000000000000001, whose ceiling is 8) and round differently
    where an exported graph evaluates them (float32 in ONNX); integers give the
    same count in eager PyTorch, under ``torch.export`` with a symbolic batch,
    and in onnxruntime.
    """
    p, q = _fraction(capacity)  # p <= q: at most ``rows``, without a min to trace
    k = (p * rows + q - 1) // q
    if not isinstance(rows, int):  # a symbolic batch (torch.export): state what holds
        torch._check(k <= rows)
    return k


@functools.lru_cache(maxsize=64)
def _fraction(capacity: float) -> tuple[int, int]:
    f = Fraction(capacity).limit_denominator(10**6)
    return f.numerator, f.denominator


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


def token_quota(capacity: float, tokens: int, real: torch.Tensor | None) -> int | torch.Tensor:
    """How many of a row's tokens go on: :func:`capacity_rows` of its real tokens.

    ``real`` None: every row has ``tokens`` real ones, and the quota is one int
    (a static shape); else a ``(B,)`` tensor, ``ceil(capacity * n)`` per row.
    """
    if real is None:
        return capacity_rows(capacity, tokens)
    p, q = _fraction(capacity)
    return (real.sum(1) * p + q - 1) // q


@dataclass(frozen=True)
class Tokens:
    """An active set of tokens: some of the ``(row, token)`` positions of a ``(B, T)`` batch.

    Packed per row, so that a block runs on them as ``(b, n)`` sequences: the
    rows with an active token, each row's active tokens first and in causal
    order, padded to the longest row. The padding entries point at inactive
    tokens of their row (distinct ones), so gathering them reads real values
    and writing those values back changes nothing.

    Attributes:
        rows: ``(b,)`` the batch rows; None: every row, in order.
        index: ``(b, n)`` each entry's token within its row; None: every token, in order.
        real: ``(b, n)`` bool, the entries that are active tokens; None: all are.
    """

    rows: torch.Tensor | None = None
    index: torch.Tensor | None = None
    real: torch.Tensor | None = None

    @property
    def dense(self) -> bool:
        """Every token of every row: gathering and scattering are no-ops."""
        return self.rows is None and self.index is None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, ...)`` -> ``(b, n, ...)``: the entries of ``x``."""
        if self.index is None:
            return x if self.rows is None else x.index_select(0, self.rows)
        if self.rows is None:
            return x.gather(1, _spread(self.index, x))
        return x[self.rows[:, None], self.index]

    def scatter(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, ...)`` with the entries replaced by ``values`` ``(b, n, ...)``, out
        of place (autograd follows it). Padding entries must carry their gathered values."""
        if self.index is None:
            return values if self.rows is None else x.index_copy(0, self.rows, values)
        if self.rows is None:
            return x.scatter(1, _spread(self.index, x), values)
        return x.flatten(0, 1).index_copy(0, self.flat(x.shape[1]),
                                          values.flatten(0, 1)).view_as(x)

    def merge(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``new`` at the real entries, ``old`` (what was gathered) at the padding ones."""
        if self.real is None:
            return new
        return torch.where(self.real.view(*self.real.shape, *[1] * (new.dim() - 2)), new, old)

    def flat(self, tokens: int) -> torch.Tensor:
        """``(b * n,)`` each entry's place in the ``(B * T)`` flattened batch (index given)."""
        rows = torch.arange(self.index.shape[0], device=self.index.device) \
            if self.rows is None else self.rows
        return (rows[:, None] * tokens + self.index).flatten()

    def fill(self, out: torch.Tensor, value: int | float) -> torch.Tensor:
        """Set the real entries of ``out`` ``(B, T)`` to ``value``, in place."""
        if self.index is None:
            return fill_rows(out, self.rows, value)
        flat, every = self.flat(out.shape[1]), out.view(-1)
        if self.real is None:
            return every.index_fill_(0, flat, value).view_as(out)
        values = torch.where(self.real.flatten(), value, every.gather(0, flat))
        return every.scatter_(0, flat, values).view_as(out)

    def mask(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        """``(B, T)`` bool: True at the real entries."""
        return self.fill(torch.zeros(batch, tokens, dtype=torch.bool, device=device), True)

    def narrow(self, keep: torch.Tensor) -> Tokens | None:
        """The active set after a decision: the entries where ``keep`` ``(b, n)`` bool is True
        (never a padding entry); None when there is none. One host read per call.

        The shrinking active set of the token constructs, as :func:`take` is the
        sample constructs' (and built on it): rows left with no token are dropped,
        and each row's kept tokens are packed first, in order. Returns this set
        itself when every entry is kept.
        """
        if self.real is not None:
            keep = keep & self.real
        if keep.shape[1] == 1:  # one token per row (a decoding step): rows go or stay
            return self._rows(keep.reshape(-1).nonzero().squeeze(1), keep.shape[0])
        return self._keep(keep, keep.sum(1).tolist())

    def _rows(self, sel: torch.Tensor, b: int) -> Tokens | None:
        """The entries of rows ``sel`` (of this set's ``b``): whole rows stay."""
        if not sel.shape[0]:
            return None
        if sel.shape[0] == b:
            return self
        rows, *index = take(self.rows, sel, *(() if self.index is None else (self.index,)))
        return Tokens(rows, index[0] if index else None, None)  # kept entries are real

    def _keep(self, keep: torch.Tensor, counts: list[int]) -> Tokens | None:
        live = [i for i, c in enumerate(counts) if c]
        if not live:
            return None
        if self.real is None and len(live) == len(counts) and min(counts) == keep.shape[1]:
            return self  # nothing left the set
        sel = None if len(live) == len(counts) else torch.tensor(live, device=keep.device)
        rows, *index = take(self.rows, sel, *(() if self.index is None else (self.index,)))
        index = index[0] if index else None
        kept = [counts[i] for i in live]
        if index is None and min(kept) == keep.shape[1]:
            return Tokens(rows, index, None)  # whole rows stay, as they were
        n = max(kept)
        keep = keep if sel is None else keep.index_select(0, sel)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]
        index = order if index is None else index.gather(1, order)
        real = None if min(kept) == n else \
            torch.arange(n, device=keep.device) < torch.tensor(kept, device=keep.device)[:, None]
        return Tokens(rows, index, real)


def pack(selected: torch.Tensor) -> Tokens | None:
    """The active set of the tokens ``selected`` ``(B, T)`` bool; None when none is."""
    return Tokens().narrow(selected)


def _spread(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``index`` ``(B, n)`` expanded over the trailing dimensions of ``x`` ``(B, T, ...)``."""
    return index.view(*index.shape, *[1] * (x.dim() - 2)).expand(*index.shape, *x.shape[2:])
