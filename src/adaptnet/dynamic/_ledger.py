"""The compute ledger: multiply-adds actually executed, by module.

Built on ``torch.utils.flop_counter.FlopCounterMode``, which counts at the
operator level (``mm``, ``addmm``, ``bmm``, convolutions, attention), so it sees
exactly what ran: a path no sample took, a step a halted sample skipped, an
expert no token picked all count zero. Two gaps are filled here: the fused
``nn.LSTM``/``nn.GRU``/``nn.RNN`` kernels are not counted by PyTorch, so their
multiply-adds are added from the standard formula; and PyTorch has no formula
for the CPU kernel of ``scaled_dot_product_attention``
(``_scaled_dot_product_flash_attention_for_cpu``, forward and backward), so it
is given the one PyTorch uses for the GPU kernels; nor for ``grouped_mm``
(:class:`~adaptnet.dynamic.StackedExperts`), counted here as its groups' matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from adaptnet.dynamic._partition import Tokens
from adaptnet.errors import DynamicError

__all__ = ["MacCount", "active_rows", "charged", "charged_tokens", "count_macs",
           "current_ledger"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _grouped_mm(a, b, *args, out_shape=None, **kwargs) -> int:
    """``grouped_mm``'s flops: each row of the grouped operand meets one group's matrix."""
    if len(a) == 2 and len(b) == 3:  # (S, K) x (E, K, N) -> (S, N): the forward
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:  # (M, S) x (S, N) -> (E, M, N): a weight's gradient
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 2:  # (E, M, K) x (K, S) -> (M, S)
        return 2 * a[1] * a[2] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[-1]  # (E, M, K) x (E, K, N): batched


# What FlopCounterMode leaves out (its formulas receive the arguments' shapes).
_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 _cpu_attention_backward,
             torch.ops.aten._grouped_mm: _grouped_mm}


@dataclass
class MacCount:
    """Multiply-adds executed inside a :func:`count_macs` block (filled when it ends).

    Attributes:
        total: all multiply-adds.
        by_module: per module, named as ``FlopCounterMode`` names them
            (class-rooted paths such as ``"Sequential.0"``); a module's count
            includes its children's.
        per_sample: with ``count_macs(batch_size=B)``, a ``(B,)`` float64 tensor:
            the multiply-adds each input row caused. Work inside adaptnet's
            dynamic constructs is charged to the rows it ran for (a path, the
            samples still active at a step, an exit, an expert's tokens); other
            work is shared equally by all ``B`` rows. ``per_sample.sum()`` equals
            ``total``.
        per_token: with ``count_macs(batch_size=B, tokens=T)``, a ``(B, T)``
            float64 tensor: the multiply-adds each token caused. Work of the
            per-token constructs is charged to the tokens it ran for (a block
            call on ``n`` tokens: each pays ``1/n`` of it); other work is shared
            equally by all ``B * T`` tokens. ``per_sample`` is its row sums.
    """

    total: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    per_sample: torch.Tensor | None = None
    per_token: torch.Tensor | None = None


class _Ledger:
    """Attributes the counter's running total to the units active between boundaries.

    A unit is an input row, or with ``tokens`` one of each row's tokens (row-major).
    """

    def __init__(self, counter: FlopCounterMode, batch_size: int, tokens: int | None) -> None:
        self.counter = counter
        self.tokens = tokens
        self.per_unit = torch.zeros(batch_size * (tokens or 1), dtype=torch.float64)
        self.ids: torch.Tensor | None = None  # active units, as input unit numbers
        self.whole_rows = True  # ids (when set) are whole rows of tokens, in order
        self.mark = 0

    def flush(self) -> None:
        flops = self.counter.get_total_flops()
        delta, self.mark = flops - self.mark, flops
        if delta == 0:
            return
        if self.ids is None:
            self.per_unit += delta / 2 / len(self.per_unit)
        elif len(self.ids):
            self.per_unit.index_add_(0, self.ids, torch.full((len(self.ids),),
                                                             delta / 2 / len(self.ids),
                                                             dtype=torch.float64))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The units of rows ``ids`` of the current frame."""
        outer, t = self.ids, self.tokens
        if t is None:
            return ids if outer is None else outer[ids]
        if outer is not None and not self.whole_rows:
            raise DynamicError(_NESTED)
        if outer is None:
            return (ids[:, None] * t + torch.arange(t)).flatten()
        return outer.view(-1, t)[ids].flatten()

    def entries(self, tokens: Tokens, t: int) -> torch.Tensor:
        """The units of the real entries of ``tokens``, one per entry (a row's units repeat
        when its tokens are counted per row)."""
        index = tokens.index.cpu()
        b, n = index.shape
        rows = torch.arange(b) if tokens.rows is None else tokens.rows.cpu()
        real = None if tokens.real is None else tokens.real.cpu().flatten()
        if self.tokens is None:  # per row: a row pays per token it has here
            ids = rows[:, None].expand(b, n).flatten()
            ids = ids if real is None else ids[real]
            return ids if self.ids is None else self.ids[ids]
        if self.tokens != t:
            raise DynamicError(f"count_macs(tokens={self.tokens}): a per-token construct ran "
                               f"on sequences of {t} tokens; count with tokens={t}.")
        if self.ids is not None and not self.whole_rows:
            raise DynamicError(_NESTED)
        flat = (rows[:, None] * t + index).flatten()
        flat = flat if real is None else flat[real]
        return flat if self.ids is None else self.ids[flat]


_NESTED = ("count_macs(tokens=...) charges each token its own work; a per-token construct "
           "nested inside another's block cannot be attributed per token. Count per row "
           "(batch_size only) instead.")


# The open ledger: a plain module global, not a ContextVar, so that torch.compile reads it
# as a constant it guards on instead of breaking the graph at every dynamic construct.
# count_macs blocks do not nest across threads; one process counts one block at a time.
_LEDGER: _Ledger | None = None


def current_ledger() -> _Ledger | None:
    """The ledger of the open ``count_macs(batch_size=...)`` block, or None."""
    return _LEDGER


def charged(ids: torch.Tensor | None, fn: Callable, *args: object) -> object:
    """``fn(*args)``, its work charged to rows ``ids`` when a ledger is open.

    The dynamic constructs call every sub-batch through this: with no
    ``count_macs(batch_size=...)`` block open it costs one global read.
    """
    if _LEDGER is None or ids is None:
        return fn(*args)
    with active_rows(ids):
        return fn(*args)


def charged_tokens(tokens: Tokens | None, t: int, fn: Callable, *args: object) -> object:
    """``fn(*args)``, its work charged to the real entries of ``tokens`` (of sequences of ``t``
    tokens) when a ledger is open: the per-token constructs call every block through this."""
    if _LEDGER is None or tokens is None or tokens.dense:
        return fn(*args)
    if tokens.index is None:
        return charged(tokens.rows, fn, *args)
    with _active(_LEDGER.entries(tokens, t)):
        return fn(*args)


@contextlib.contextmanager
def active_rows(ids: torch.Tensor) -> Iterator[None]:
    """Charge the work in this block to rows ``ids`` of the enclosing block's rows.

    Dynamic constructs wrap each sub-batch call in it (row ``r`` of the
    sub-batch is row ``ids[r]`` of their input). A no-op unless a
    ``count_macs(batch_size=...)`` block is active.
    """
    if _LEDGER is None:
        yield
        return
    with _active(_LEDGER.rows(ids.detach().to("cpu", torch.long)), whole_rows=True):
        yield


@contextlib.contextmanager
def _active(units: torch.Tensor, whole_rows: bool = False) -> Iterator[None]:
    ledger = _LEDGER
    ledger.flush()
    outer, outer_rows = ledger.ids, ledger.whole_rows
    ledger.ids, ledger.whole_rows = units, whole_rows and outer_rows
    try:
        yield
    finally:
        ledger.flush()
        ledger.ids, ledger.whole_rows = outer, outer_rows


@contextlib.contextmanager
def count_macs(batch_size: int | None = None, tokens: int | None = None
               ) -> Iterator[MacCount]:
    """Count the multiply-adds executed in the block.

    Matrix products count ``m*n*k`` (a Linear layer on ``b`` rows: ``b*in*out``),
    convolutions ``out_elements * in_channels/groups * kernel``, attention its two
    matmuls plus projections, recurrent layers ``steps * gates * hidden * (in + hidden)``
    per layer and direction. Elementwise work is not counted.

    Args:
        batch_size: the number of input rows ``B``; given, ``per_sample`` is filled.
        tokens: the tokens per row ``T`` of the per-token constructs' inputs; given
            (with ``batch_size``), ``per_token`` is filled too.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> with adaptnet.count_macs() as macs:
        ...     _ = nn.Linear(10, 20)(torch.randn(3, 10))
        >>> macs.total, isinstance(macs, adaptnet.dynamic.MacCount)
        (600, True)
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 0):
        raise DynamicError(f"count_macs(): batch_size must be the number of input rows (an int "
                           f">= 0) or None, got {batch_size!r}.")
    if tokens is not None and (batch_size is None or isinstance(tokens, bool)
                               or not isinstance(tokens, int) or tokens < 1):
        raise DynamicError(f"count_macs(): tokens must be the tokens per row (an int >= 1), "
                           f"given with batch_size; got tokens={tokens!r}, "
                           f"batch_size={batch_size!r}.")
    result = MacCount()
    counter = FlopCounterMode(display=False, custom_mapping=_FORMULAS)
    pending: dict[int, tuple[int, set[str], int]] = {}

    def before(module: nn.Module, args: tuple) -> None:
        if isinstance(module, nn.RNNBase) and args:
            pending[id(module)] = (counter.get_total_flops(), set(counter.mod_tracker.parents),
                                   _rnn_macs(module, args[0]))

    def after(module: nn.Module, args: tuple, output: object) -> None:
        entry = pending.pop(id(module), None)
        if entry is not None and counter.get_total_flops() == entry[0]:  # the kernel was missed
            for name in entry[1] | {"Global"}:
                counter.flop_counts[name][torch.ops.aten.lstm] += 2 * entry[2]

    global _LEDGER
    ledger = _Ledger(counter, batch_size, tokens) if batch_size is not None else None
    outer, _LEDGER = _LEDGER, ledger
    with counter:
        hooks = (nn.modules.module.register_module_forward_pre_hook(before),
                 nn.modules.module.register_module_forward_hook(after))
        try:
            yield result
        finally:
            for h in hooks:
                h.remove()
            _LEDGER = outer
            if ledger is not None:
                ledger.flush()
                units = ledger.per_unit.view(batch_size, tokens or 1)
                result.per_sample = units.sum(1)
                result.per_token = units if tokens else None
    counts = counter.get_flop_counts()
    result.total = counter.get_total_flops() // 2
    result.by_module = {name: sum(ops.values()) // 2 for name, ops in counts.items()
                        if name != "Global"}


def _rnn_macs(rnn: nn.RNNBase, inp: torch.Tensor | PackedSequence) -> int:
    if isinstance(inp, PackedSequence):
        steps = inp.data.shape[0]  # sum of the sequence lengths
    elif inp.dim() == 2:
        steps = inp.shape[0]  # unbatched (T, in)
    else:
        steps = inp.shape[0] * inp.shape[1]
    gates, hidden = _GATES[rnn.mode], rnn.hidden_size
    out = rnn.proj_size or hidden
    directions = 2 if rnn.bidirectional else 1
    total, size_in = 0, rnn.input_size
    for _ in range(rnn.num_layers):
        per_step = gates * hidden * (size_in + out) + (hidden * out if rnn.proj_size else 0)
        total += directions * steps * per_step
        size_in = out * directions
    return total
