"""Adaptive depth: apply blocks repeatedly, each sample until it halts.

Weight-tied depth is data: an execution order over a pool of blocks
(``order=[0, 0, 0, 0]`` applies one shared block four times;
``order=[0, 1, 0, 1]`` alternates two). At every step only the samples that
have not halted run the next block (a *shrinking active set*): the batch is
filtered, never masked, so compute follows the mean number of steps, not the
maximum.

How it works: the loop carries the active samples' ids, states and the
halting policy's per-sample carry, all aligned row by row. After each step the
policy marks which rows finish; their results are set aside and the rest are
kept by indexing (which autograd follows). At the end the finished rows are
merged back into the original order with one gather.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from adaptnet.dynamic._guards import check_batched, refuse_tracing
from adaptnet.dynamic._ledger import active_rows
from adaptnet.dynamic._route import merge_rows
from adaptnet.errors import DynamicError

__all__ = ["ACTHalting", "AdaptiveDepth", "DepthResult", "PonderNetHalting", "ThresholdHalting"]


class Step(NamedTuple):
    """A halting policy's decision for the active rows after one step."""

    done: torch.Tensor  # (b,) bool: halts now
    weight: torch.Tensor | None  # (b,) weight of this state in the output; None: output = state
    carry: dict[str, torch.Tensor]  # per-row policy state, row-aligned
    cost: torch.Tensor  # (b,) contribution to the ponder cost
    prob: torch.Tensor | None = None  # (b,) halting probability of this step (PonderNet)


@dataclass(frozen=True)
class DepthResult:
    """What :class:`AdaptiveDepth` returns.

    Attributes:
        output: ``(B, ...)`` the final state (threshold) or the halting-weighted
            mean of the states (ACT).
        steps: ``(B,)`` int64, blocks each sample executed (1 to ``max_steps``).
        ponder: ``(B,)`` ponder cost per sample: ``N + R`` for ACT (``R`` carries
            gradient), the step count for the threshold policy.
        aux_loss: scalar to add to the task loss: ``time_penalty * ponder.mean()``
            for ACT, ``beta * KL(halting || geometric prior)`` for PonderNet, zero
            for the threshold policy.
        halting: PonderNet only: ``(B, max_steps)`` probability of halting at each
            step (zero after a sample's last executed step; rows sum to 1).
        step_states: PonderNet only: ``(B, max_steps, ...)`` the state after each
            step (zero after a sample's last executed step), for the expected loss
            ``sum_n halting[:, n] * loss(step_states[:, n])``.
    """

    output: torch.Tensor
    steps: torch.Tensor
    ponder: torch.Tensor
    aux_loss: torch.Tensor
    halting: torch.Tensor | None = None
    step_states: torch.Tensor | None = None

    def expected_loss(self, per_step_loss: torch.Tensor) -> torch.Tensor:
        """PonderNet's reconstruction loss: ``mean_b sum_n halting[b, n] * per_step_loss[b, n]``.

        Args:
            per_step_loss: ``(B, max_steps)`` the task loss of each step's state
                (values after a sample's last step are ignored).

        Raises:
            DynamicError: the result has no halting distribution (not PonderNet).
        """
        if self.halting is None:
            raise DynamicError("expected_loss() needs PonderNetHalting; this result has no "
                               "halting distribution.")
        if per_step_loss.shape != self.halting.shape:
            raise DynamicError(f"expected_loss(): per_step_loss must have shape "
                               f"{list(self.halting.shape)} (B, max_steps), got "
                               f"{list(per_step_loss.shape)}.")
        mask = self.halting > 0  # keep 0 * NaN from unexecuted steps out of the sum
        return torch.where(mask, self.halting * per_step_loss, 0.0).sum(1).mean()


class ThresholdHalting(nn.Module):
    """Halt a sample after the first step whose confidence reaches ``threshold``.

    Confidence is ``sigmoid(head(state))``; ``head`` maps ``(b, ...)`` states
    to ``(b,)`` or ``(b, 1)`` logits. The output is the state after the last
    executed step. The decision is not differentiable: train ``head`` with a
    loss of your own (e.g. on per-step correctness), or use :class:`ACTHalting`.

    Raises:
        DynamicError: ``threshold`` outside (0, 1].
    """

    def __init__(self, head: nn.Module, threshold: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < float(threshold) <= 1.0:
            raise DynamicError(f"ThresholdHalting: threshold must lie in (0, 1], got "
                               f"{threshold!r}; 0.5 halts when halting is more likely than not.")
        self.head = head
        self.threshold = float(threshold)

    def start(self, b: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def step(self, state, carry, last):
        done = (_halting_prob(self.head, state) >= self.threshold) | last
        # weight None: the output is the last executed state itself (no 0 * state arithmetic)
        return Step(done, None, carry, torch.ones(done.shape, dtype=state.dtype,
                                                  device=state.device))


class ACTHalting(nn.Module):
    """Adaptive Computation Time (Graves 2016, "Adaptive Computation Time for RNNs").

    At step ``t`` a halting unit gives ``h_t = sigmoid(head(state_t))``. A
    sample halts at the first ``N`` whose cumulative ``h`` reaches ``1 - eps``
    (or at ``max_steps``); its output is ``sum_t p_t * state_t`` with
    ``p_t = h_t`` for ``t < N`` and the remainder ``R = 1 - sum_{t<N} h_t`` at
    ``N``. The ponder cost ``N + R`` is returned per sample, and
    ``time_penalty * mean(N + R)`` as the auxiliary loss (``R`` carries the
    gradient, as in the paper).

    Raises:
        DynamicError: ``eps`` outside (0, 1) or a negative ``time_penalty``.
    """

    def __init__(self, head: nn.Module, eps: float = 0.01, time_penalty: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < float(eps) < 1.0:
            raise DynamicError(f"ACTHalting: eps must lie in (0, 1), got {eps!r}; Graves uses "
                               "0.01.")
        if not 0 <= float(time_penalty) < math.inf:
            raise DynamicError(f"ACTHalting: time_penalty must be finite and >= 0, got "
                               f"{time_penalty!r}.")
        self.head = head
        self.eps = float(eps)
        self.time_penalty = float(time_penalty)

    def start(self, b: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cum": like.new_zeros(b)}

    def step(self, state, carry, last):
        h = _halting_prob(self.head, state)
        cum = carry["cum"]
        done = (cum + h >= 1.0 - self.eps) | last
        remainder = 1.0 - cum
        weight = torch.where(done, remainder, h)
        cost = torch.where(done, 1.0 + remainder, torch.ones_like(h))  # sums to N + R
        return Step(done, weight, {"cum": cum + h}, cost)


class PonderNetHalting(nn.Module):
    """PonderNet (Banino et al. 2021, "PonderNet: Learning to Ponder").

    At step ``n`` the head gives ``lambda_n = sigmoid(head(state_n))`` (``1`` at
    ``max_steps``); the probability of halting at ``n`` is
    ``p_n = lambda_n * prod_{j<n} (1 - lambda_j)``.

    - **Training**, as in the paper: each sample runs until its unhalted mass
      ``prod (1 - lambda_j)`` is at most ``eps`` (the rest of the mass goes to its
      last step), and the result carries ``halting`` ``p`` and ``step_states`` for
      the expected loss (:meth:`DepthResult.expected_loss`); ``aux_loss`` is
      ``beta * KL(p || Geometric(lambda_p))``, the prior truncated to
      ``max_steps``. ``output`` is the state at a halting step *sampled* from
      each sample's ``p`` (``torch.multinomial``; seed with ``torch.manual_seed``).
    - **Evaluation**, deterministic: a sample halts at the median of its halting
      distribution (the first step where ``sum_{j<=n} p_j >= 0.5``); ``output``
      is that step's state. (The paper samples the halting step at inference.)

    Raises:
        DynamicError: ``lambda_p`` or ``eps`` outside (0, 1), or a negative ``beta``.
    """

    def __init__(self, head: nn.Module, lambda_p: float = 0.2, beta: float = 0.01,
                 eps: float = 0.05) -> None:
        super().__init__()
        for name, value in (("lambda_p", lambda_p), ("eps", eps)):
            if not 0.0 < float(value) < 1.0:
                raise DynamicError(f"PonderNetHalting: {name} must lie in (0, 1), got "
                                   f"{value!r}.")
        if not 0 <= float(beta) < math.inf:
            raise DynamicError(f"PonderNetHalting: beta must be finite and >= 0, got {beta!r}.")
        self.head = head
        self.lambda_p, self.beta, self.eps = float(lambda_p), float(beta), float(eps)

    def start(self, b: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"unhalted": like.new_ones(b)}

    def step(self, state, carry, last):
        lam = torch.where(last, torch.ones_like(last, dtype=state.dtype),
                          _halting_prob(self.head, state))
        unhalted = carry["unhalted"]
        p = unhalted * lam
        left = unhalted * (1.0 - lam)
        if self.training:
            done = (left <= self.eps) | last
            p = torch.where(done, unhalted, p)  # the remaining mass goes to the last step
        else:
            done = (left <= 0.5) | last  # the median of the halting distribution
        cost = torch.ones(done.shape, dtype=state.dtype, device=state.device)
        return Step(done, None, {"unhalted": left}, cost, p)

    def kl_to_prior(self, halting: torch.Tensor) -> torch.Tensor:
        """``mean_b KL(halting[b] || truncated Geometric(lambda_p))``."""
        n = torch.arange(halting.shape[1], dtype=halting.dtype, device=halting.device)
        log_prior = math.log(self.lambda_p) + n * math.log(1.0 - self.lambda_p)
        log_prior = log_prior - torch.logsumexp(log_prior, 0)  # truncated to max_steps
        mask = halting > 0
        terms = torch.where(mask, halting * (halting.clamp_min(1e-30).log() - log_prior), 0.0)
        return terms.sum(1).mean()


class AdaptiveDepth(nn.Module):
    """Apply ``blocks`` in ``order`` until each sample halts (at most ``max_steps``).

    Args:
        blocks: one block (shared by every step) or a sequence of blocks, each
            mapping a ``(b, ...)`` state to a state of the same shape.
        halting: :class:`ThresholdHalting`, :class:`ACTHalting` or
            :class:`PonderNetHalting`.
        max_steps: the bound on every sample's loop.
        order: block index for each step, ``len(order) == max_steps``; default
            cycles through the blocks (``t % len(blocks)``).

    Returns (from ``forward(x)``):
        A :class:`DepthResult`.

    Raises:
        DynamicError: ``max_steps < 1``, a bad ``order``, a block that changes
            the state's shape, or a halting head of the wrong output shape.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> depth = adaptnet.AdaptiveDepth(nn.Linear(4, 4),
        ...                                adaptnet.ACTHalting(nn.Linear(4, 1)), max_steps=6)
        >>> result = depth(torch.randn(8, 4))
        >>> result.output.shape, result.steps.shape
        (torch.Size([8, 4]), torch.Size([8]))
    """

    def __init__(self, blocks: nn.Module | Sequence[nn.Module],
                 halting: ThresholdHalting | ACTHalting | PonderNetHalting, max_steps: int,
                 order: Sequence[int] | None = None) -> None:
        super().__init__()
        pool = [blocks] if isinstance(blocks, nn.Module) else list(blocks)
        if not isinstance(max_steps, int) or max_steps < 1:
            raise DynamicError(f"AdaptiveDepth: max_steps must be an integer >= 1, got "
                               f"{max_steps!r}; it bounds every sample's loop.")
        if not pool:
            raise DynamicError("AdaptiveDepth: blocks is empty; give one block or a list.")
        order = [t % len(pool) for t in range(max_steps)] if order is None else list(order)
        if len(order) != max_steps or any(not 0 <= i < len(pool) for i in order):
            raise DynamicError(
                f"AdaptiveDepth: order must list {max_steps} block indices (one per step) in "
                f"[0, {len(pool)}), got {order!r}."
            )
        if not isinstance(halting, ThresholdHalting | ACTHalting | PonderNetHalting):
            raise DynamicError(f"AdaptiveDepth: halting must be ThresholdHalting, ACTHalting "
                               f"or PonderNetHalting, got {type(halting).__name__}.")
        self.blocks = nn.ModuleList(pool)
        self.halting = halting
        self.max_steps = max_steps
        self.order = tuple(order)

    def forward(self, x: torch.Tensor) -> DepthResult:  # (B, ...) -> DepthResult
        refuse_tracing("AdaptiveDepth")
        check_batched(x, "AdaptiveDepth")
        B = x.shape[0]
        ids = torch.arange(B, device=x.device)
        state = x
        acc = None  # the weighted sum of states (ACT, PonderNet), row-aligned with ids
        carry = self.halting.start(B, x.new_empty(0))
        cost = x.new_zeros(B)
        done_parts: list[tuple[torch.Tensor, ...]] = []  # (ids, output, steps, ponder)
        trace: list[tuple[torch.Tensor, ...]] = []  # PonderNet: (flat (id, step), p, state)
        for t, block_index in enumerate(self.order):
            if ids.numel() == 0:
                break
            with active_rows(ids):
                new = self.blocks[block_index](state)
                if new.shape != state.shape:
                    raise DynamicError(
                        f"AdaptiveDepth: block {block_index} maps {list(state.shape)} to "
                        f"{list(new.shape)}; blocks must keep the state's shape.")
                last = torch.full_like(ids, t == self.max_steps - 1, dtype=torch.bool)
                done, weight, carry, step_cost, prob = self.halting.step(new, carry, last)
            if prob is not None:
                trace.append((ids * self.max_steps + t, prob, new))
            if weight is None:
                out = new
            else:
                out = weight.view(-1, *[1] * (x.dim() - 1)) * new
                out = out if acc is None else acc + out
            cost = cost + step_cost
            if done.any():
                fin = done.nonzero().squeeze(1)
                done_parts.append((ids[fin], out[fin], torch.full_like(fin, t + 1), cost[fin]))
                keep = (~done).nonzero().squeeze(1)
                ids, state, cost = ids[keep], new[keep], cost[keep]
                acc = state if weight is None else out[keep]  # threshold carries no sum
                carry = {k: v[keep] for k, v in carry.items()}
            else:
                state, acc = new, out
        if not done_parts:  # B == 0
            empty = x.new_zeros(0)
            steps = torch.zeros(0, dtype=torch.long, device=x.device)
            if isinstance(self.halting, PonderNetHalting):
                return DepthResult(x, steps, empty, empty.sum(), x.new_zeros(0, self.max_steps),
                                   x.new_zeros(0, self.max_steps, *x.shape[1:]))
            return DepthResult(x, steps, empty, empty.sum())
        output, steps, ponder = merge_rows(*([p[i] for p in done_parts] for i in range(4)))
        if trace:
            return self._pondernet_result(x, output, steps, ponder, trace)
        penalty = getattr(self.halting, "time_penalty", 0.0)
        aux = penalty * ponder.mean() if penalty else ponder.new_zeros(())
        return DepthResult(output, steps, ponder, aux)

    def _pondernet_result(self, x, output, steps, ponder, trace) -> DepthResult:
        """Scatter the per-step probabilities and states into (B, max_steps[, ...])."""
        B, S = x.shape[0], self.max_steps
        flat = torch.cat([t[0] for t in trace])
        halting = x.new_zeros(B * S).index_add(0, flat, torch.cat([t[1] for t in trace]))
        states = x.new_zeros(B * S, *x.shape[1:]).index_add(0, flat,
                                                            torch.cat([t[2] for t in trace]))
        halting, states = halting.view(B, S), states.view(B, S, *x.shape[1:])
        if self.halting.training:  # the output follows the halting distribution
            # A NaN row (a non-finite sample) would make multinomial raise; sampled
            # uniformly instead, its NaN output reaches the loss and the trainer's guard.
            sampled = torch.multinomial(halting.detach().nan_to_num(1.0), 1).squeeze(1)
            output = states[torch.arange(B, device=x.device), sampled]
        aux = self.halting.beta * self.halting.kl_to_prior(halting)
        return DepthResult(output, steps, ponder, aux, halting, states)


def _halting_prob(head: nn.Module, state: torch.Tensor) -> torch.Tensor:
    logits = head(state)
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits.squeeze(1)
    if logits.shape != state.shape[:1]:
        raise DynamicError(f"halting head must return (b,) or (b, 1) logits for b = "
                           f"{state.shape[0]} states, got {list(logits.shape)}.")
    return torch.sigmoid(logits)
