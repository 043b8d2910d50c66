"""The compute ledger: multiply-adds actually executed, by module.

Built on ``torch.utils.flop_counter.FlopCounterMode``, which counts at the
operator level (``mm``, ``addmm``, ``bmm``, convolutions, attention), so it sees
exactly what ran: a path no sample took, a step a halted sample skipped, an
expert no token picked all count zero. One gap is filled here: the fused
``nn.LSTM``/``nn.GRU``/``nn.RNN`` kernels are not counted by PyTorch 2.13, so
their multiply-adds are added from the standard formula.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["MacCount", "count_macs"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@dataclass
class MacCount:
    """Multiply-adds executed inside a :func:`count_macs` block (filled when it ends).

    Attributes:
        total: all multiply-adds.
        by_module: per module, named as ``FlopCounterMode`` names them
            (class-rooted paths such as ``"Sequential.0"``); a module's count
            includes its children's.
    """

    total: int = 0
    by_module: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def count_macs() -> Iterator[MacCount]:
    """Count the multiply-adds executed in the block.

    Matrix products count ``m*n*k`` (a Linear layer on ``b`` rows: ``b*in*out``),
    convolutions ``out_elements * in_channels/groups * kernel``, attention its two
    matmuls plus projections, recurrent layers ``steps * gates * hidden * (in + hidden)``
    per layer and direction. Elementwise work is not counted.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> with adaptnet.count_macs() as macs:
        ...     _ = nn.Linear(10, 20)(torch.randn(3, 10))
        >>> macs.total
        600
    """
    result = MacCount()
    counter = FlopCounterMode(display=False)
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

    with counter:
        hooks = (nn.modules.module.register_module_forward_pre_hook(before),
                 nn.modules.module.register_module_forward_hook(after))
        try:
            yield result
        finally:
            for h in hooks:
                h.remove()
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
