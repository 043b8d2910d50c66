"""Mixture of experts with top-k routing and sorted dispatch.

Each token (a row of the input) is sent to its ``k`` highest-scoring experts.
Dispatch is sorted: the (token, expert) assignments are sorted by expert, each
expert runs once on the contiguous block of its tokens, and the outputs are
weighted by the gates and summed back per token with ``index_add``. An expert
no token picks is never called; a dense MoE would run all of them on every
token. Experts of one shape kept in stacked weights (:class:`StackedExperts`)
run all at once: one gather, one ``grouped_mm`` per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet._renamed import renamed_attribute, warn_renamed
from adaptnet.dynamic._ledger import charged, current_ledger
from adaptnet.dynamic._partition import capacity_rows, check_capacity
from adaptnet.dynamic._result import LossFn, export_as_pytree
from adaptnet.errors import DynamicError

__all__ = ["MoE", "MoEResult", "StackedExperts"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@export_as_pytree
@dataclass(frozen=True)
class MoEResult:
    """What :class:`MoE` returns (a :class:`~adaptnet.dynamic.DynamicResult`).

    Attributes:
        output: ``(..., d_out)`` the gate-weighted sum of each token's experts.
        experts: ``(..., k)`` int64, the experts each token was routed to, best first.
        gates: ``(..., k)`` their weights (softmax over the top-k logits).
        dropped: ``(..., k)`` bool, assignments dropped by the slot limit.
        load: ``(E,)`` int64, assignments each expert received (before dropping).
        aux_loss: scalar load-balancing loss, ``balance_weight * E * sum_e f_e * P_e``
            (Fedus et al. 2021, Switch Transformer): ``f_e`` the fraction of
            assignments to expert ``e``, ``P_e`` its mean router probability.
    """

    output: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    dropped: torch.Tensor
    load: torch.Tensor
    aux_loss: torch.Tensor

    prediction = renamed_attribute("dynamic.MoEResult", "prediction", "output")

    def task_loss(self, target: torch.Tensor, loss_fn: LossFn,
                  per_sample: LossFn | None = None) -> torch.Tensor:
        return loss_fn(self.output, target)

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"experts": self.experts}


class StackedExperts(nn.Module):
    """``E`` two-layer experts of one shape in stacked weights, which :class:`MoE` runs all at
    once: its assignments sorted by expert, one gather, one ``grouped_mm`` per layer.

    Expert ``e`` maps ``x`` to ``act(x W1[e]ᵀ + b1[e]) W2[e]ᵀ + b2[e]``; with ``gated``
    (SwiGLU, as in Mixtral's and Llama's MLPs) to ``(act(x G[e]ᵀ) * x U[e]ᵀ) W2[e]ᵀ``, where
    ``W1[e]`` holds ``G[e]`` above ``U[e]``. The weights have transformers' layout
    (``w1``: ``(E, hidden, d_in)``, or ``(E, 2 * hidden, d_in)`` gated, like
    ``gate_up_proj``; ``w2``: ``(E, d_out, hidden)`` like ``down_proj``), so a Mixtral
    block's experts load as they are, and each expert starts as ``nn.Linear`` would.
    ``experts[e]`` is expert ``e`` as a module (a view of the same weights).

    On the CPU, calls whose experts average ``LOOP_ROWS`` assignments or more run one
    matmul per expert instead (measured faster there, ``benchmarks/bench_moe_peers.py``),
    as do float64 inputs and widths whose rows are not 16-byte multiples (``grouped_mm``
    takes float32, bfloat16 and float16, aligned).

    Args:
        num: the number of experts ``E``.
        d_in, hidden, d_out: the widths (``d_out`` defaults to ``d_in``).
        activation: ``"relu"``, ``"gelu"`` or ``"silu"``.
        gated: SwiGLU-style experts (no biases then, as in Mixtral's).
        bias: biases on both layers (ungated experts only).

    Raises:
        DynamicError: a count or width below 1, an unknown activation, or biases on
            gated experts.

    Example:
        >>> import torch, adaptnet
        >>> from adaptnet.dynamic import StackedExperts
        >>> experts = StackedExperts(8, 16, 64, activation="silu", gated=True, bias=False)
        >>> moe = adaptnet.MoE(experts, torch.nn.Linear(16, 8), k=2)
        >>> moe(torch.randn(5, 16)).output.shape, experts.w1.shape
        (torch.Size([5, 16]), torch.Size([8, 128, 16]))
    """

    #: from this many assignments per expert on (on average), the CPU runs a loop
    LOOP_ROWS = 256

    def __init__(self, num: int, d_in: int, hidden: int, d_out: int | None = None, *,
                 activation: str = "relu", gated: bool = False, bias: bool = True) -> None:
        super().__init__()
        d_out = d_in if d_out is None else d_out
        for name, value in (("num", num), ("d_in", d_in), ("hidden", hidden), ("d_out", d_out)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DynamicError(f"StackedExperts: {name} must be a positive int, got "
                                   f"{value!r}.")
        if activation not in ACTIVATIONS:
            raise DynamicError(f"StackedExperts: activation must be one of "
                               f"{sorted(ACTIVATIONS)}, got {activation!r}.")
        if gated and bias:
            raise DynamicError("StackedExperts: gated (SwiGLU) experts have no biases, as in "
                               "Mixtral's; give bias=False.")
        self.num, self.hidden, self.gated, self.activation = num, hidden, gated, activation
        width = 2 * hidden if gated else hidden
        self.w1 = nn.Parameter(torch.empty(num, width, d_in))
        self.w2 = nn.Parameter(torch.empty(num, d_out, hidden))
        self.b1 = nn.Parameter(torch.empty(num, width)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num, d_out)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's layers as ``nn.Linear`` initialises them."""
        with torch.no_grad():
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                for e in range(self.num):
                    nn.init.kaiming_uniform_(w[e], a=math.sqrt(5))
                if b is not None:
                    bound = 1 / math.sqrt(w.shape[-1])
                    nn.init.uniform_(b, -bound, bound)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, e: int) -> nn.Module:
        return _Expert(self, e)

    def forward(self, x: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
        """``(n, d_in)`` rows sorted by expert, ``counts`` ``(E,)`` rows per expert (an int:
        the same for each, static shapes: one matmul per expert) -> ``(n, d_out)``, each
        row through its expert."""
        n = x.shape[0]
        grouped = not isinstance(counts, int) and n and \
            x.dtype in (torch.float32, torch.bfloat16, torch.float16) and \
            (x.device.type != "cpu" or n < self.LOOP_ROWS * self.num) and \
            _aligned(x, self.w1, self.w2)
        if not grouped:  # unbind, not w[e]: one gradient tensor for the stack, not E
            sizes = [counts] * self.num if isinstance(counts, int) else counts.tolist()
            w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
            b1, b2 = ([None] * self.num, [None] * self.num) if self.b1 is None else \
                (self.b1.unbind(0), self.b2.unbind(0))
            out = [self._mlp(rows, w1[e], b1[e], w2[e], b2[e])
                   for e, rows in enumerate(x.split(sizes)) if sizes[e]]
            return torch.cat(out) if out else x.new_zeros(0, self.w2.shape[1])
        offsets = counts.cumsum(0).to(torch.int32)
        which = None if self.b1 is None else \
            torch.repeat_interleave(torch.arange(self.num, device=x.device), counts,
                                    output_size=n)
        h = F.grouped_mm(x, self.w1.transpose(-2, -1), offs=offsets)
        h = self._inner(h if which is None else h + self.b1[which])
        y = F.grouped_mm(h, self.w2.transpose(-2, -1), offs=offsets)
        return y if which is None else y + self.b2[which]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on ``x``."""
        return self._mlp(x, self.w1[e], None if self.b1 is None else self.b1[e], self.w2[e],
                         None if self.b2 is None else self.b2[e])

    def _mlp(self, x, w1, b1, w2, b2) -> torch.Tensor:
        return F.linear(self._inner(F.linear(x, w1, b1)), w2, b2)

    def _inner(self, h: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        if not self.gated:
            return act(h)
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up


def _softmax(t: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of ``(n, m)`` scores, as ``torch.softmax(t, -1)``.

    On the CPU, torch's softmax over a short last dimension is slow (74 µs for
    ``(512, 8)`` here, 11 µs over the first dimension of the transpose): it runs on the
    transpose there.
    """
    if t.device.type != "cpu" or t.shape[-1] > 64:
        return torch.softmax(t, dim=-1)
    return torch.softmax(t.transpose(0, 1), dim=0).transpose(0, 1)


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` takes these: every row and matrix 16-byte aligned."""
    return all(t.data_ptr() % 16 == 0 and
               all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1])
               for t in tensors) and all(t.shape[-2] * t.element_size() % 16 == 0
                                         for t in tensors[1:])


class _Expert(nn.Module):
    """Expert ``e`` of a :class:`StackedExperts`, as a module (no weights of its own)."""

    def __init__(self, stack: StackedExperts, e: int) -> None:
        super().__init__()
        self.__dict__["stack"] = stack  # not a submodule: the stack owns the weights
        self.e = e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.expert(self.e, x)


class MoE(nn.Module):
    """Top-k mixture of experts over the last dimension of its input.

    Args:
        experts: ``E`` modules mapping ``(n, d_in)`` to ``(n, d_out)``, all with the
            same output width (each called once on its tokens); or one
            :class:`StackedExperts` (experts of one shape, run all at once).
        router: maps ``(n, d_in)`` to ``(n, E)`` logits.
        k: experts per token, ``1 <= k <= E``.
        capacity_factor: each expert's *slots* per call, in the units of
            Switch Transformer (Fedus et al. 2022): an expert takes at most
            ``ceil(capacity_factor * n * k / E)`` of the ``n * k`` assignments of
            ``n`` tokens, and the overflow policy drops the assignments with the
            *lowest gates* for that expert (ties: later tokens first). A dropped
            assignment adds nothing to its token's output (the remaining gates
            are not renormalised), so keep a residual connection around the MoE.
            ``None``: no limit.
        balance_weight: weight of the load-balancing loss in ``aux_loss``.
        fixed_slots: every expert runs on exactly its slots, the assignments
            above padded with zero-weight rows (among equal gates, topk's
            choice), so shapes depend only on ``n``: the forward compiles with
            ``fullgraph=True`` and exports. The same result as without it, at a
            cost of ``E * ceil(capacity_factor * n * k / E)`` expert rows
            however the router splits the tokens. Needs a ``capacity_factor``.

    Raises:
        DynamicError: no experts, ``k`` out of range, a non-positive
            ``capacity_factor``, ``fixed_slots`` without one, or a negative
            ``balance_weight``; at call time, a router of the wrong width or
            experts of different output widths.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> moe = adaptnet.MoE([nn.Linear(8, 8) for _ in range(4)], nn.Linear(8, 4), k=2)
        >>> r = moe(torch.randn(2, 5, 8))     # (batch, tokens, features)
        >>> r.output.shape, r.experts.shape
        (torch.Size([2, 5, 8]), torch.Size([2, 5, 2]))
    """

    def __init__(self, experts: Sequence[nn.Module] | StackedExperts, router: nn.Module, k: int = 2,
                 capacity_factor: float | None = None, balance_weight: float = 0.01,
                 fixed_slots: bool = False, **old: float | None) -> None:
        super().__init__()
        stacked = isinstance(experts, StackedExperts)
        experts = experts if stacked else list(experts)
        if old:  # adaptnet 0.1's capacity=c: every expert on ceil(c * n) slots
            capacity_factor, fixed_slots = _old_capacity(old, capacity_factor, experts, k)
        if not stacked and not experts:
            raise DynamicError("MoE: experts is empty; give at least one expert module.")
        if not isinstance(k, int) or not 1 <= k <= len(experts):
            raise DynamicError(f"MoE: k must be an integer from 1 to the number of experts "
                               f"({len(experts)}), got {k!r}.")
        if capacity_factor is not None and not float(capacity_factor) > 0:
            raise DynamicError(f"MoE: capacity_factor must be > 0 (or None for no limit), got "
                               f"{capacity_factor!r}; 1.25 is a common choice.")
        if not 0 <= float(balance_weight) < math.inf:
            raise DynamicError(f"MoE: balance_weight must be finite and >= 0, got "
                               f"{balance_weight!r}.")
        if fixed_slots and capacity_factor is None:
            raise DynamicError("MoE: fixed_slots=True runs every expert on exactly its slots, "
                               "which capacity_factor sets; give one, e.g. capacity_factor=1.25.")
        self.experts = experts if stacked else nn.ModuleList(experts)
        self.stacked = stacked
        self.router = router
        self.k = k
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.balance_weight = float(balance_weight)
        self.fixed_slots = bool(fixed_slots)

    def forward(self, x: torch.Tensor) -> MoEResult:  # (..., d_in) -> MoEResult
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            got = "a 0-d tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DynamicError(f"MoE: expected tokens of shape (..., d_in), got {got}.")
        lead, tokens = x.shape[:-1], x.reshape(-1, x.shape[-1])  # (n, d_in)
        n, E, k = tokens.shape[0], len(self.experts), self.k
        logits = self.router(tokens)  # (n, E)
        if logits.shape != (n, E):
            raise DynamicError(f"MoE: the router must return (n, {E}) logits for n = {n} "
                               f"tokens and {E} experts, got {list(logits.shape)}.")
        top_logits, top = logits.topk(k, dim=-1)  # (n, k), best first
        gates = _softmax(top_logits)  # (n, k)

        flat_expert = top.reshape(-1)  # (n*k,) assignment -> expert
        flat_gate = gates.reshape(-1)
        # (E,) assignments per expert; a scatter, not bincount, whose output size depends on
        # the data (a graph break under torch.compile)
        load = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        tokens_per_row = max(1, math.prod(lead[1:]))  # the ledger's rows: x's first dimension
        if self.fixed_slots:
            flat_token = torch.arange(n, device=x.device).repeat_interleave(k)
            output, dropped = self._static_dispatch(tokens, flat_expert, flat_gate, flat_token,
                                                    load, tokens_per_row)
            return self._result(output, lead, logits, top, gates, dropped, load)

        # Sorted dispatch: assignments grouped by expert, one call per expert (or one for all).
        if self.capacity_factor is None:
            dropped = torch.zeros_like(flat_expert, dtype=torch.bool)
            order = torch.argsort(flat_expert, stable=True)
            per_expert = load
        else:
            keep = _within_capacity(flat_expert, flat_gate, E,
                                    math.ceil(self.capacity_factor * n * k / E))
            dropped = ~keep
            kept = keep.nonzero().squeeze(1)
            order = kept[torch.argsort(flat_expert[kept], stable=True)]
            per_expert = torch.bincount(flat_expert[order], minlength=E)
        token_sorted = order // k  # assignment i is token i // k's
        if self.stacked:  # one gather, every expert at once
            output = self._all_at_once(tokens, token_sorted, per_expert, flat_gate[order],
                                       tokens_per_row)
            return self._result(output, lead, logits, top, gates, dropped, load)
        outs, start = [], 0
        for e, count in enumerate(per_expert.tolist()):
            if count:
                rows = token_sorted[start:start + count]
                outs.append(charged(rows // tokens_per_row if current_ledger() else None,
                                    self.experts[e], tokens.index_select(0, rows)))
            start += count
        widths = {o.shape[1:] for o in outs}
        if len(widths) > 1:
            raise DynamicError(f"MoE: experts return different output shapes {sorted(widths)};"
                               " all experts must map to the same width.")
        if outs:
            y = torch.cat(outs) * flat_gate[order].unsqueeze(1).to(outs[0].dtype)
            output = y.new_zeros(n, *y.shape[1:]).index_add(0, token_sorted, y)
        else:  # no tokens: one expert on zero rows gives the output's shape
            output = self.experts[0](tokens[:0])

        return self._result(output, lead, logits, top, gates, dropped, load)

    def _static_dispatch(self, tokens: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor,
                         token: torch.Tensor, load: torch.Tensor, tokens_per_row: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed slots: every expert on exactly ``C`` slots; (output, dropped)."""
        n, E, A = tokens.shape[0], len(self.experts), expert.numel()
        # C = ceil(capacity_factor * n * k / E), counted in integers (so that export and ONNX
        # agree with eager); an expert holds at most n assignments, so the share stops at 1
        C = min(capacity_rows(min(self.capacity_factor * self.k / E, 1.0), n), A)
        # Each expert's C best assignments by gate: one topk over an (E, A) table in which
        # the assignments of other experts score -1 (gates lie in (0, 1]).
        mine = expert[None, :] == torch.arange(E, device=tokens.device)[:, None]
        best = torch.where(mine, gate[None, :], -1.0).topk(C, dim=1)  # (E, C)
        valid, pick = best.values >= 0, best.indices
        rows, weight = token[pick], torch.where(valid, best.values, 0.0)
        kept = torch.zeros(A, dtype=torch.bool, device=tokens.device)
        kept = kept.index_put((pick.flatten(),), valid.flatten(), accumulate=True)
        if self.stacked:  # every expert on its C rows at once
            return self._all_at_once(tokens, rows.flatten(), C, weight.flatten(),
                                     tokens_per_row), ~kept
        output = None
        for e in range(E):
            y = charged(rows[e] // tokens_per_row if current_ledger() else None,
                        self.experts[e], tokens.index_select(0, rows[e]))
            y = y * weight[e].unsqueeze(1).to(y.dtype)
            output = (y.new_zeros(n, *y.shape[1:]) if output is None else output)
            if output.shape[1:] != y.shape[1:]:
                raise DynamicError(f"MoE: experts return different output shapes "
                                   f"{[list(output.shape[1:]), list(y.shape[1:])]}; all experts "
                                   "must map to the same width.")
            output = output.index_add(0, rows[e], y)
        return output, ~kept

    def _all_at_once(self, tokens: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor | int,
                     weight: torch.Tensor, tokens_per_row: int) -> torch.Tensor:
        """:class:`StackedExperts` on ``rows`` of ``tokens`` (sorted by expert, ``counts`` per
        expert), each output times its ``weight``, summed per token."""
        y = charged(rows // tokens_per_row if current_ledger() else None, self.experts,
                    tokens.index_select(0, rows), counts)
        y = y * weight.unsqueeze(1).to(y.dtype)
        return y.new_zeros(tokens.shape[0], *y.shape[1:]).index_add(0, rows, y)

    def _result(self, output, lead, logits, top, gates, dropped, load) -> MoEResult:
        n, E, k = logits.shape[0], len(self.experts), self.k
        probs = _softmax(logits)  # (n, E)
        if n:
            f = load.to(probs.dtype) / (n * k)
            aux = self.balance_weight * E * (f * probs.mean(0)).sum()
        else:
            aux = probs.new_zeros(())
        return MoEResult(output.reshape(*lead, *output.shape[1:]), top.reshape(*lead, k),
                         gates.reshape(*lead, k), dropped.reshape(*lead, k), load, aux)


def _old_capacity(old: dict, capacity_factor: float | None, experts: list, k: int
                  ) -> tuple[float, bool]:
    """adaptnet 0.1's ``MoE(capacity=c)`` as ``capacity_factor = c * E / k`` with fixed slots."""
    if set(old) != {"capacity"}:
        raise TypeError(f"MoE() got unexpected keyword argument(s) {sorted(old)}.")
    capacity = check_capacity(old["capacity"], "MoE")
    if capacity is None:
        return capacity_factor, False
    if capacity_factor is not None:
        raise DynamicError(f"MoE: capacity={capacity!r} fixes every expert's slots, so "
                           f"capacity_factor={capacity_factor!r} cannot be honoured as well; "
                           "give capacity_factor (with fixed_slots=True) only.")
    factor = capacity * len(experts) / k
    warn_renamed(f"MoE(capacity={capacity!r})",
                 f"MoE(capacity_factor={factor!r}, fixed_slots=True)", stacklevel=4)
    return factor, True


def _within_capacity(expert: torch.Tensor, gate: torch.Tensor, E: int, capacity: int
                     ) -> torch.Tensor:
    """Which assignments fit: per expert, the ``capacity`` with the highest gates."""
    # Rank assignments within their expert by gate (descending), earlier tokens first on ties.
    by_gate = torch.argsort(gate, descending=True, stable=True)
    by_expert = by_gate[torch.argsort(expert[by_gate], stable=True)]
    counts = torch.bincount(expert, minlength=E)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(expert.numel(), device=expert.device) - starts[expert[by_expert]]
    keep = torch.empty_like(expert, dtype=torch.bool)
    keep[by_expert] = rank < capacity
    return keep
