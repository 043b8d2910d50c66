"""Adaptive depth: apply blocks repeatedly, each sample until it halts.

Weight-tied depth is data: an execution order over a pool of blocks
(``order=[0, 0, 0, 0]`` applies one shared block four times;
``order=[0, 1, 0, 1]`` alternates two). At every step only the samples that
have not halted run the next block (a *shrinking active set*): the batch is
filtered, never masked, so compute follows the mean number of steps, not the
maximum.

How it works: the loop carries the active samples' ids, states and the
halting policy's per-sample carry, all aligned row by row. After each step the
policy decides which rows halt; every active row's result is written into the
``(B, ...)`` outputs (the rows that go on are overwritten later) and the rest
are kept by one ``nonzero`` and a gather, which autograd follows.

Halting policies implement :class:`HaltingPolicy`; ``capacity=`` replaces
their halting decision by a fixed share of rows going on (the least halted),
which keeps every shape static (see ``adaptnet.dynamic._partition``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from adaptnet._renamed import renamed_attribute
from adaptnet.dynamic._guards import check_batched, refuse_tracing
from adaptnet.dynamic._ledger import charged
from adaptnet.dynamic._partition import (
    capacity_rows,
    check_capacity,
    fill_rows,
    least,
    take,
    write_rows,
)
from adaptnet.dynamic._result import LossFn, export_as_pytree
from adaptnet.errors import DynamicError

__all__ = ["ACTHalting", "AdaptiveDepth", "Decision", "DepthResult", "HaltingPolicy",
           "PonderNetHalting", "Step", "ThresholdHalting"]


class Decision(NamedTuple):
    """What a halting policy wants for the active rows after one step."""

    done: torch.Tensor  # (b,) bool: halts now (always True on the last step)
    halted: torch.Tensor  # (b,) how far each row is towards halting; capacity mode lets the
    #                       rows with the lowest values go on
    h: torch.Tensor  # (b,) the step's halting probability (or whatever settle() needs)


class Step(NamedTuple):
    """A halting policy's result for the active rows, once ``done`` is final."""

    weight: torch.Tensor | None  # (b,) weight of this state in the output; None: output = state
    carry: dict[str, torch.Tensor]  # per-row policy state, row-aligned
    cost: torch.Tensor  # (b,) contribution to the ponder cost
    prob: torch.Tensor | None = None  # (b,) halting probability of this step (per_step policies)


@runtime_checkable
class HaltingPolicy(Protocol):
    """What :class:`AdaptiveDepth` asks of a halting policy (ThresholdHalting, ACT, PonderNet).

    ``decide`` says which rows want to halt after a step; ``settle`` gives
    their weights, carry and cost once ``done`` is final (capacity mode may
    overrule ``decide``). ``per_step`` policies keep every step's halting
    probability and state in the result (PonderNet's expected loss); ``output``
    picks the result's output once the loop ends (``halting`` and ``states``
    are None unless ``per_step``).
    """

    per_step: bool

    def start(self, b: int, like: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def decide(self, state: torch.Tensor, carry: dict[str, torch.Tensor],
               last: torch.Tensor) -> Decision: ...

    def settle(self, decision: Decision, carry: dict[str, torch.Tensor],
               done: torch.Tensor) -> Step: ...

    def aux_loss(self, ponder: torch.Tensor, halting: torch.Tensor | None) -> torch.Tensor: ...

    def output(self, output: torch.Tensor, halting: torch.Tensor | None,
               states: torch.Tensor | None) -> torch.Tensor: ...


@export_as_pytree
@dataclass(frozen=True)
class DepthResult:
    """What :class:`AdaptiveDepth` returns (a :class:`~adaptnet.dynamic.DynamicResult`).

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

    prediction = renamed_attribute("dynamic.DepthResult", "prediction", "output")

    def task_loss(self, target: torch.Tensor, loss_fn: LossFn,
                  per_sample: LossFn | None = None) -> torch.Tensor:
        """``loss_fn(output, target)``; PonderNet: the expected loss over steps.

        The expected loss needs ``per_sample``, a loss giving one value per row.

        Raises:
            DynamicError: a PonderNet result and no ``per_sample`` loss.
        """
        if self.halting is None or self.step_states is None:
            return loss_fn(self.output, target)
        if per_sample is None:
            raise DynamicError("a PonderNet result needs a per-sample loss for its expected "
                               "loss over steps; a loss_fn returns one number per batch.")
        B, N = self.step_states.shape[:2]
        per = per_sample(self.step_states.flatten(0, 1), target.repeat_interleave(N, 0))
        return self.expected_loss(per.view(B, N))

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"steps": self.steps.float()}  # one type for every result: float (B,)


class ThresholdHalting(nn.Module):
    """Halt a sample after the first step whose confidence reaches ``threshold``.

    Confidence is ``sigmoid(head(state))``; ``head`` maps ``(b, ...)`` states
    to ``(b,)`` or ``(b, 1)`` logits. The output is the state after the last
    executed step. The decision is not differentiable: train ``head`` with a
    loss of your own (e.g. on per-step correctness), or use :class:`ACTHalting`.

    Raises:
        DynamicError: ``threshold`` outside (0, 1].

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> policy = adaptnet.dynamic.ThresholdHalting(nn.Linear(8, 1), threshold=0.5)
        >>> depth = adaptnet.AdaptiveDepth(nn.Linear(8, 8), policy, max_steps=3).eval()
        >>> r = depth(torch.randn(4, 8))
        >>> r.steps.shape
        torch.Size([4])
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

    per_step = False

    def decide(self, state, carry, last) -> Decision:
        h = _halting_prob(self.head, state)
        return Decision((h >= self.threshold) | last, h, h)

    def settle(self, decision, carry, done) -> Step:
        # weight None: the output is the last executed state itself (no 0 * state arithmetic)
        return Step(None, carry, torch.ones_like(decision.h))

    def aux_loss(self, ponder, halting) -> torch.Tensor:
        return ponder.new_zeros(())

    def output(self, output, halting, states) -> torch.Tensor:
        return output  # the loop's output as it is


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

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> policy = adaptnet.dynamic.ACTHalting(nn.Linear(8, 1))
        >>> depth = adaptnet.AdaptiveDepth(nn.Linear(8, 8), policy, max_steps=4)
        >>> r = depth.eval()(torch.randn(5, 8))
        >>> r.output.shape, bool((r.steps >= 1).all() and (r.steps <= 4).all())
        (torch.Size([5, 8]), True)
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

    per_step = False

    def decide(self, state, carry, last) -> Decision:
        h = _halting_prob(self.head, state)
        reached = carry["cum"] + h
        return Decision((reached >= 1.0 - self.eps) | last, reached, h)

    def settle(self, decision, carry, done) -> Step:
        cum, h = carry["cum"], decision.h
        remainder = 1.0 - cum
        # A row that goes on adds h; capped at the remainder, so that capacity mode (which
        # may keep a row that wanted to halt) never weighs states by more than 1 in all.
        # In exact mode a row goes on only while cum + h < 1 - eps, so the cap never binds.
        weight = torch.where(done, remainder, torch.minimum(h, remainder))
        cost = torch.where(done, 1.0 + remainder, torch.ones_like(h))  # sums to N + R
        return Step(weight, {"cum": cum + weight}, cost)

    def aux_loss(self, ponder, halting) -> torch.Tensor:
        if not self.time_penalty or ponder.numel() == 0:
            return ponder.new_zeros(())
        return self.time_penalty * ponder.mean()

    def output(self, output, halting, states) -> torch.Tensor:
        return output  # the loop's output as it is


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

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> policy = adaptnet.dynamic.PonderNetHalting(nn.Linear(8, 1), lambda_p=0.3)
        >>> r = adaptnet.AdaptiveDepth(nn.Linear(8, 8), policy, max_steps=5)(torch.randn(3, 8))
        >>> r.halting.shape  # training: each step's halting probability per sample
        torch.Size([3, 5])
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

    per_step = True

    def decide(self, state, carry, last) -> Decision:
        lam = torch.where(last, torch.ones_like(last, dtype=state.dtype),
                          _halting_prob(self.head, state))
        left = carry["unhalted"] * (1.0 - lam)
        # training: run until the unhalted mass is at most eps; evaluation: the median
        done = (left <= (self.eps if self.training else 0.5)) | last
        return Decision(done, -left, lam)

    def settle(self, decision, carry, done) -> Step:
        unhalted, lam = carry["unhalted"], decision.h
        p = unhalted * lam
        if self.training:
            p = torch.where(done, unhalted, p)  # the remaining mass goes to the last step
        return Step(None, {"unhalted": unhalted * (1.0 - lam)}, torch.ones_like(lam), p)

    def aux_loss(self, ponder, halting) -> torch.Tensor:
        return self.beta * self.kl_to_prior(halting) if halting.shape[0] else \
            halting.new_zeros(())

    def output(self, output: torch.Tensor, halting: torch.Tensor, states: torch.Tensor
               ) -> torch.Tensor:
        """Training: the state at a halting step sampled from ``halting``; else ``output``."""
        if not self.training:
            return output
        # A NaN row (a non-finite sample) would make multinomial raise; sampled
        # uniformly instead, its NaN output reaches the loss and the trainer's guard.
        sampled = torch.multinomial(halting.detach().nan_to_num(1.0), 1).squeeze(1)
        return states[torch.arange(states.shape[0], device=states.device), sampled]

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
        halting: :class:`ThresholdHalting`, :class:`ACTHalting`,
            :class:`PonderNetHalting`, or any :class:`HaltingPolicy`.
        max_steps: the bound on every sample's loop.
        order: block index for each step, ``len(order) == max_steps``; default
            cycles through the blocks (``t % len(blocks)``).
        capacity: ``None`` for exact mode (each sample halts when its policy
            says). A fraction in (0, 1] selects *capacity mode*: of the ``b``
            rows active after a step, exactly ``ceil(capacity * b)`` go on, the
            least halted by the policy's ``Decision.halted`` (threshold: lowest
            halting probability; ACT: lowest cumulative halting; PonderNet:
            most unhalted mass; among equal values, topk's choice), and the others
            halt, whatever they wanted. Shapes depend only on ``B``, so the
            forward compiles with ``fullgraph=True`` and exports.

    Returns (from ``forward(x)``):
        A :class:`DepthResult`.

    Raises:
        DynamicError: ``max_steps < 1``, a bad ``order``, a halting policy
            without the :class:`HaltingPolicy` methods, a capacity outside
            (0, 1], a block that changes the state's shape, or a halting head of
            the wrong output shape.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> policy = adaptnet.dynamic.ACTHalting(nn.Linear(4, 1))
        >>> depth = adaptnet.AdaptiveDepth(nn.Linear(4, 4), policy, max_steps=6)
        >>> result = depth(torch.randn(8, 4))
        >>> result.output.shape, result.steps.shape
        (torch.Size([8, 4]), torch.Size([8]))
    """

    def __init__(self, blocks: nn.Module | Sequence[nn.Module],
                 halting: HaltingPolicy, max_steps: int, order: Sequence[int] | None = None,
                 capacity: float | None = None) -> None:
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
        if not isinstance(halting, nn.Module) or not isinstance(halting, HaltingPolicy):
            raise DynamicError(f"AdaptiveDepth: halting must be an nn.Module implementing "
                               f"HaltingPolicy (per_step, start, decide, settle, aux_loss, "
                               f"output), "
                               f"e.g. ThresholdHalting, ACTHalting or PonderNetHalting; got "
                               f"{type(halting).__name__}.")
        self.blocks = nn.ModuleList(pool)
        self.halting = halting
        self.max_steps = max_steps
        self.order = tuple(order)
        self.capacity = check_capacity(capacity, "AdaptiveDepth")

    def forward(self, x: torch.Tensor) -> DepthResult:  # (B, ...) -> DepthResult
        if self.capacity is None:
            refuse_tracing("AdaptiveDepth")
        check_batched(x, "AdaptiveDepth")
        B, S, policy = x.shape[0], self.max_steps, self.halting
        # The loop's state. Active set, row-aligned: ids (None: every row), state, the
        # weighted sum acc, the ponder cost and the policy's carry. Outputs (B, ...).
        run: dict = {"ids": None, "state": x, "acc": None, "cost": x.new_zeros(B),
                     "carry": policy.start(B, x.new_empty(0)), "output": None,
                     "ponder": None, "steps": torch.zeros(B, dtype=torch.long, device=x.device)}
        if policy.per_step:  # (B * S[, ...]): row b's step t at b * S + t
            run["halting"] = x.new_zeros(B * S)
            run["states"] = x.new_zeros(B * S, *x.shape[1:])
        for t in range(S):
            if not self._step(t, run, B):
                break
        output, steps, ponder = run["output"], run["steps"], run["ponder"]
        if not policy.per_step:
            return DepthResult(policy.output(output, None, None), steps, ponder,
                               policy.aux_loss(ponder, None))
        halting, states = run["halting"].view(B, S), run["states"].view(B, S, *x.shape[1:])
        return DepthResult(policy.output(output, halting, states), steps, ponder,
                           policy.aux_loss(ponder, halting), halting, states)

    def _step(self, t: int, run: dict, B: int) -> bool:
        """Step ``t`` on the active rows, updating ``run``; False when no row goes on.

        One method per step, so that under ``torch.compile`` the one data-dependent
        decision (a ``nonzero``) is the step's only graph break.
        """
        policy, ids, state, S = self.halting, run["ids"], run["state"], self.max_steps
        n, last_step, block_index = state.shape[0], t == S - 1, self.order[t]
        new = charged(ids, self.blocks[block_index], state)
        if new.shape != state.shape:
            raise DynamicError(
                f"AdaptiveDepth: block {block_index} maps {list(state.shape)} to "
                f"{list(new.shape)}; blocks must keep the state's shape.")
        last = torch.full((n,), last_step, dtype=torch.bool, device=state.device)
        decision = charged(ids, policy.decide, new, run["carry"], last)
        if self.capacity is None or last_step:
            done, keep = decision.done, None
        else:
            keep = least(decision.halted, capacity_rows(self.capacity, n))
            done = torch.ones_like(last).index_fill_(0, keep, False)
        step = policy.settle(decision, run["carry"], done)
        if step.weight is None:
            out = new
        else:
            out = step.weight.view(-1, *[1] * (new.dim() - 1)) * new
            out = out if run["acc"] is None else run["acc"] + out
        cost = run["cost"] + step.cost
        run["output"] = write_rows(run["output"], ids, out, B)
        run["ponder"] = write_rows(run["ponder"], ids, cost, B)
        fill_rows(run["steps"], ids, t + 1)
        if policy.per_step:
            flat = (torch.arange(B, device=new.device) if ids is None else ids) * S + t
            run["halting"] = run["halting"].index_copy(0, flat, step.prob)
            run["states"] = run["states"].index_copy(0, flat, new)
        if last_step:
            return False
        if self.capacity is None:  # the nonzero is written here, not in a helper: one break
            keep = (~done).nonzero().squeeze(1)
            keep = None if keep.shape[0] == n else keep
        names = list(step.carry)
        ids, new, out, cost, *kept = take(ids, keep, new, out, cost, *step.carry.values())
        run.update(ids=ids, state=new, cost=cost, carry=dict(zip(names, kept, strict=True)),
                   acc=None if step.weight is None else out)
        return new.shape[0] > 0


def _halting_prob(head: nn.Module, state: torch.Tensor) -> torch.Tensor:
    logits = head(state)
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits.squeeze(1)
    if logits.shape != state.shape[:1]:
        raise DynamicError(f"halting head must return (b,) or (b, 1) logits for b = "
                           f"{state.shape[0]} states, got {list(logits.shape)}.")
    return torch.sigmoid(logits)
