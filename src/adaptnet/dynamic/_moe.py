"""Mixture of experts with top-k routing and sorted dispatch.

Each token (a row of the input) is sent to its ``k`` highest-scoring experts.
Dispatch is sorted: the (token, expert) assignments are sorted by expert, each
expert runs once on the contiguous block of its tokens, and the outputs are
weighted by the gates and summed back per token with ``index_add``. An expert
no token picks is never called; a dense MoE would run all of them on every
token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adaptnet._renamed import renamed_attribute, warn_renamed
from adaptnet.dynamic._ledger import charged, current_ledger
from adaptnet.dynamic._partition import capacity_rows, check_capacity
from adaptnet.dynamic._result import LossFn, export_as_pytree
from adaptnet.errors import DynamicError

__all__ = ["MoE", "MoEResult"]


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


class MoE(nn.Module):
    """Top-k mixture of experts over the last dimension of its input.

    Args:
        experts: ``E`` modules mapping ``(n, d_in)`` to ``(n, d_out)``, all with the
            same output width.
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

    def __init__(self, experts: Sequence[nn.Module], router: nn.Module, k: int = 2,
                 capacity_factor: float | None = None, balance_weight: float = 0.01,
                 fixed_slots: bool = False, **old: float | None) -> None:
        super().__init__()
        experts = list(experts)
        if old:  # adaptnet 0.1's capacity=c: every expert on ceil(c * n) slots
            capacity_factor, fixed_slots = _old_capacity(old, capacity_factor, experts, k)
        if not experts:
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
        self.experts = nn.ModuleList(experts)
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
        gates = torch.softmax(top_logits, dim=-1)  # (n, k)

        flat_expert = top.reshape(-1)  # (n*k,) assignment -> expert
        flat_gate = gates.reshape(-1)
        flat_token = torch.arange(n, device=x.device).repeat_interleave(k)
        # (E,) assignments per expert; a scatter, not bincount, whose output size depends on
        # the data (a graph break under torch.compile)
        load = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        tokens_per_row = max(1, math.prod(lead[1:]))  # the ledger's rows: x's first dimension
        if self.fixed_slots:
            output, dropped = self._static_dispatch(tokens, flat_expert, flat_gate, flat_token,
                                                    load, tokens_per_row)
            return self._result(output, lead, logits, top, gates, dropped, load)

        # Sorted dispatch: assignments grouped by expert, one call per expert.
        if self.capacity_factor is None:
            dropped = torch.zeros_like(flat_expert, dtype=torch.bool)
            order = torch.argsort(flat_expert, stable=True)
            counts = load.tolist()
        else:
            keep = _within_capacity(flat_expert, flat_gate, E,
                                    math.ceil(self.capacity_factor * n * k / E))
            dropped = ~keep
            kept = keep.nonzero().squeeze(1)
            order = kept[torch.argsort(flat_expert[kept], stable=True)]
            counts = torch.bincount(flat_expert[order], minlength=E).tolist()
        token_sorted = flat_token[order]
        outs, start = [], 0
        for e, count in enumerate(counts):
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
        kept = torch.zeros(A, dtype=torch.bool, device=tokens.device)
        kept = kept.index_put((pick.flatten(),), valid.flatten(), accumulate=True)
        return output, ~kept

    def _result(self, output, lead, logits, top, gates, dropped, load) -> MoEResult:
        n, E, k = logits.shape[0], len(self.experts), self.k
        probs = torch.softmax(logits, dim=-1)  # (n, E)
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
