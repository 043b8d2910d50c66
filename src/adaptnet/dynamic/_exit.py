"""Early exit (BranchyNet: Teerapittayanon et al. 2016): leave at the first confident head.

In training every exit runs on every sample, for a weighted joint loss. In
evaluation each sample leaves at the first exit whose rule is met, and
later stages run only on the samples still active (the batch is filtered, as
in adaptive depth). :func:`calibrate_exits` picks the threshold for a target
accuracy or a target compute on validation data.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet._renamed import renamed_arguments, renamed_attribute
from adaptnet.dynamic._guards import check_batched, refuse_tracing
from adaptnet.dynamic._ledger import charged, count_macs
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

__all__ = ["AllExits", "Calibration", "EarlyExit", "ExitResult", "calibrate_exits",
           "calibrate_temperatures"]

RULES = ("max_prob", "entropy")


@functools.partial(export_as_pytree, static=("weights",))
@dataclass(frozen=True)
class ExitResult:
    """What :class:`EarlyExit` returns (a :class:`~adaptnet.dynamic.DynamicResult`).

    Attributes:
        output: ``(B, C)`` each sample's logits: from the exit it took
            (evaluation) or from the last exit (training).
        exit_index: ``(B,)`` int64, the exit each sample took (training: the last).
        exit_logits: training only: every exit's ``(B, C)`` logits, first to last.
        weights: the joint-loss weight of each exit.
    """

    output: torch.Tensor
    exit_index: torch.Tensor
    exit_logits: tuple[torch.Tensor, ...]
    weights: tuple[float, ...]

    def joint_loss(self, target: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
                   ) -> torch.Tensor:
        """BranchyNet's training loss: ``sum_i weights[i] * loss_fn(exit_logits[i], target)``.

        Raises:
            DynamicError: called on an evaluation result (only one exit ran per sample).
        """
        if not self.exit_logits:
            raise DynamicError("joint_loss() needs every exit's logits, which only training "
                               "mode computes; call model.train() before the forward pass.")
        return sum(w * loss_fn(z, target) for w, z in zip(self.weights, self.exit_logits,
                                                          strict=True))

    logits = renamed_attribute("ExitResult", "logits", "output")
    prediction = renamed_attribute("ExitResult", "prediction", "output")

    @property
    def aux_loss(self) -> None:
        return None

    def task_loss(self, target: torch.Tensor, loss_fn: LossFn = F.cross_entropy,
                  per_sample: LossFn | None = None) -> torch.Tensor:
        """Training results: :meth:`joint_loss`; evaluation results: ``loss_fn(output, target)``."""
        return self.joint_loss(target, loss_fn) if self.exit_logits else \
            loss_fn(self.output, target)

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"exit_index": self.exit_index}


class EarlyExit(nn.Module):
    """Stages with an exit head after each; samples leave at the first confident exit.

    Args:
        stages: ``L`` modules applied in sequence.
        heads: ``L`` classifiers; ``heads[i]`` reads the output of ``stages[i]``.
            The last head is the final exit, taken by every remaining sample.
        rule: ``"max_prob"`` (leave when the top softmax probability is
            ``>= threshold``) or ``"entropy"`` (leave when the softmax entropy, in
            nats, is ``<= threshold``).
        threshold: exact mode: one value for every early exit, or ``L - 1``
            values (default 0.9); kept per exit in ``thresholds``.
        weights: joint-loss weight per exit (default 1 each).
        capacity: ``None`` for exact mode (a sample leaves when its rule
            is met). A fraction in (0, 1] selects *capacity mode*: of the ``b``
            rows reaching an early exit, exactly ``ceil(capacity * b)`` go on,
            the least confident by ``rule`` (among equal scores, topk's
            choice), and the rest leave there; shapes depend only on ``B``, so the
            whole forward compiles with ``fullgraph=True`` and exports.
            Thresholds do not apply in capacity mode.

    Raises:
        DynamicError: mismatched or empty stages/heads, an unknown rule, a
            threshold out of range (max_prob: (0, 1]; entropy: >= 0), a wrong
            number of thresholds or weights, a capacity outside (0, 1], or
            a threshold given together with a capacity.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> net = adaptnet.EarlyExit([nn.Linear(8, 8), nn.Linear(8, 8)],
        ...                          [nn.Linear(8, 3), nn.Linear(8, 3)], threshold=0.9).eval()
        >>> net(torch.randn(5, 8)).exit_index.shape
        torch.Size([5])
    """

    criterion = renamed_attribute("EarlyExit", "criterion", "rule")

    @renamed_arguments("EarlyExit", criterion="rule", thresholds="threshold")
    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module],
                 rule: str = "max_prob", threshold: float | Sequence[float] | None = None,
                 weights: Sequence[float] | None = None, capacity: float | None = None) -> None:
        super().__init__()
        stages, heads = list(stages), list(heads)
        if not stages or len(stages) != len(heads):
            raise DynamicError(f"EarlyExit: need one head per stage, got {len(stages)} stage(s) "
                               f"and {len(heads)} head(s).")
        if rule not in RULES:
            raise DynamicError(f"EarlyExit: rule must be one of {RULES}, got {rule!r}.")
        weights = [1.0] * len(heads) if weights is None else [float(w) for w in weights]
        if len(weights) != len(heads):
            raise DynamicError(f"EarlyExit: weights needs one value per exit ({len(heads)}), got "
                               f"{len(weights)}.")
        self.capacity = check_capacity(capacity, "EarlyExit")
        if self.capacity is not None and threshold is not None:
            raise DynamicError(
                f"EarlyExit: capacity={capacity!r} exits a fixed share of rows at each exit, so "
                f"threshold={threshold!r} cannot be honoured; give one of the two.")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.rule = rule
        self.weights = tuple(weights)
        self.thresholds: tuple[float, ...] = ()
        self.temperatures: tuple[float, ...] = (1.0,) * (len(heads) - 1)
        if self.capacity is None:
            self.set_thresholds(0.9 if threshold is None else threshold)

    def set_temperatures(self, temperatures: float | Sequence[float]) -> None:
        """Set the early exits' temperatures: each exit's rule reads ``logits / T``.

        :func:`calibrate_temperatures` fits them on validation data. The
        predictions stay the heads' own logits; only the exit decisions (and
        :func:`calibrate_exits`' scores) see the scaled ones.
        """
        n = len(self.heads) - 1
        values = [float(temperatures)] * n if isinstance(temperatures, int | float) else \
            [float(t) for t in temperatures]
        if len(values) != n or not all(0.0 < t < math.inf for t in values):
            raise DynamicError(f"EarlyExit: temperatures needs one positive finite value or "
                               f"{n} (one per early exit), got {temperatures!r}.")
        self.temperatures = tuple(values)

    def set_thresholds(self, thresholds: float | Sequence[float]) -> None:
        """Set the early exits' thresholds (one value for all, or one per early exit)."""
        if self.capacity is not None:
            raise DynamicError(f"EarlyExit: this model runs in capacity mode (capacity="
                               f"{self.capacity}), where thresholds do not apply; set "
                               "model.capacity = None first to use thresholds.")
        n = len(self.heads) - 1
        values = [float(thresholds)] * n if isinstance(thresholds, int | float) else \
            [float(t) for t in thresholds]
        if len(values) != n:
            raise DynamicError(f"EarlyExit: thresholds needs one value or {n} (one per early "
                               f"exit), got {len(values)}.")
        bad = [t for t in values if not (0.0 < t <= 1.0 if self.rule == "max_prob"
                                         else t >= 0.0)]
        if bad:
            allowed = "(0, 1]" if self.rule == "max_prob" else "[0, inf) nats"
            raise DynamicError(f"EarlyExit: {self.rule} thresholds must lie in {allowed}, "
                               f"got {bad}.")
        self.thresholds = tuple(values)

    def all_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's ``(B, C)`` logits for every sample (full compute)."""
        out, h = [], x
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            out.append(head(h))
        return out

    def forward(self, x: torch.Tensor) -> ExitResult:  # (B, ...) -> ExitResult
        last = len(self.heads) - 1
        if self.training:
            exits = self.all_exits(x)
            index = torch.full((x.shape[0],), last, dtype=torch.long, device=x.device)
            return ExitResult(exits[-1], index, tuple(exits), self.weights)
        if self.capacity is None:
            refuse_tracing("EarlyExit in eval mode")
        check_batched(x, "EarlyExit")
        B = x.shape[0]
        # The active set: ids (None: every row) and their state h. Each exit writes its
        # logits for every active row; later exits overwrite the rows that went on.
        ids, h, logits_out = None, x, None
        index = torch.zeros(B, dtype=torch.long, device=x.device)
        for i in range(len(self.heads)):
            ids, h, logits_out = self._exit(i, ids, h, logits_out, index)
            if h is None:
                break
        return ExitResult(logits_out, index, (), self.weights)

    def _exit(self, i: int, ids: torch.Tensor | None, h: torch.Tensor,
              logits_out: torch.Tensor | None, index: torch.Tensor
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Stage and exit ``i`` on the active rows; the next active set (``h`` None: done).

        One method per step, so that under ``torch.compile`` the one data-dependent
        decision (a ``nonzero``) is the step's only graph break.
        """
        h = charged(ids, self.stages[i], h)
        logits = charged(ids, self.heads[i], h)
        if logits.dim() != 2:
            raise DynamicError(
                f"EarlyExit: head {i} returned logits of shape {list(logits.shape)}; each "
                "head must return (B, C) logits, one row per sample. Per-token (B, T, C) "
                "exits are not supported yet: pool over T in the head (e.g. mean(1)).")
        logits_out = write_rows(logits_out, ids, logits, index.shape[0])
        if i:
            fill_rows(index, ids, i)
        if i == len(self.heads) - 1:
            return ids, None, logits_out
        t = self.temperatures[i]
        scaled = logits if t == 1.0 else logits / t
        if self.capacity is None:  # the nonzero is written here, not in a helper: one break
            keep = _goes_on(scaled, self.rule, self.thresholds[i]).nonzero().squeeze(1)
            keep = None if keep.shape[0] == h.shape[0] else keep
        else:
            keep = least(_log_confidence(scaled, self.rule),
                         capacity_rows(self.capacity, h.shape[0]))
        ids, h = take(ids, keep, h)
        return ids, (h if h.shape[0] else None), logits_out

    def exit_macs(self, sample: torch.Tensor) -> list[int]:
        """Multiply-adds to leave at each exit, for one sample ``(1, ...)``.

        A sample leaving at exit ``i`` has run stages and heads ``0..i``.
        """
        return list(itertools.accumulate(s + h for s, h in self._part_macs(sample)))

    def _part_macs(self, sample: torch.Tensor) -> list[tuple[int, int]]:
        """(stage, head) multiply-adds of each exit, for one sample."""
        parts, h = [], sample[:1]
        with torch.no_grad():
            for stage, head in zip(self.stages, self.heads, strict=True):
                with count_macs() as s:
                    h = stage(h)
                with count_macs() as m:
                    head(h)
                parts.append((s.total, m.total))
        return parts


def _goes_on(logits: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    """``(B,)`` bool: the rows that do *not* meet the exit rule and go on.

    ``max_prob``: one softmax kernel, one max, one comparison (``logsumexp``
    takes twice as long on CPU), written as the negated test so that no extra
    negation kernel runs.
    """
    if rule == "max_prob":
        return torch.softmax(logits, -1).amax(-1) < threshold
    return _score(logits, rule) < -threshold


def _log_confidence(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """Ordered as :func:`_score`; for max_prob the log of the top probability, which keeps
    rows apart where the probability itself rounds to 1.0."""
    if rule == "max_prob":
        return logits.amax(-1) - logits.logsumexp(-1)
    return _score(logits, rule)


def _score(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """Higher is more confident: the top probability, or minus the entropy."""
    logp = torch.log_softmax(logits, dim=-1)
    if rule == "max_prob":
        return logp.max(-1).values.exp()
    return (logp.exp() * logp).sum(-1)  # -entropy


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate_exits` chose and what it measured on the validation data.

    Attributes:
        threshold: the threshold now set on every early exit.
        accuracy: validation accuracy with it.
        mean_macs: mean multiply-adds per sample with it.
        full_macs: multiply-adds per sample of the network without early exits
            (every stage plus the last head).
        exit_fractions: fraction of samples leaving at each exit.
    """

    threshold: float
    accuracy: float
    mean_macs: float
    full_macs: int
    exit_fractions: tuple[float, ...]

    @property
    def compute_fraction(self) -> float:
        return self.mean_macs / self.full_macs


def calibrate_exits(model: EarlyExit, x: torch.Tensor, y: torch.Tensor, *,
                    target_accuracy: float | None = None,
                    target_compute: float | None = None, candidates: int = 201) -> Calibration:
    """Choose one threshold for every early exit from validation data, and set it.

    Give exactly one target:

    - ``target_accuracy``: the cheapest threshold (lowest mean multiply-adds)
      whose validation accuracy is at least this;
    - ``target_compute``: the most accurate threshold whose mean multiply-adds
      are at most this fraction of the network without exits.

    Every exit is computed once on ``x``; thresholds are then simulated
    (midpoints between ``candidates`` quantiles of the exits' confidence
    scores, plus "everyone at the first exit" and "never exit early"). Costs per
    exit come from :func:`count_macs` on one sample.

    Raises:
        DynamicError: not exactly one target, a target out of (0, 1], or a
            target no threshold reaches (the message gives the reachable range).

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> net = adaptnet.EarlyExit([nn.Linear(4, 4), nn.Linear(4, 4)],
        ...                          [nn.Linear(4, 3), nn.Linear(4, 3)])
        >>> x, y = torch.randn(200, 4), torch.randint(0, 3, (200,))
        >>> cal = adaptnet.calibrate_exits(net, x, y, target_compute=0.8)
        >>> cal.mean_macs <= 0.8 * cal.full_macs, cal.threshold == net.thresholds[0]
        (True, True)
    """
    if (target_accuracy is None) == (target_compute is None):
        raise DynamicError("calibrate_exits(): give exactly one of target_accuracy and "
                           "target_compute.")
    target = target_accuracy if target_accuracy is not None else target_compute
    if not 0.0 < float(target) <= 1.0:
        raise DynamicError(f"calibrate_exits(): the target must lie in (0, 1], got {target!r}.")
    if model.capacity is not None:
        raise DynamicError(f"calibrate_exits(): the model runs in capacity mode (capacity="
                           f"{model.capacity}), which has no thresholds to calibrate; set "
                           "model.capacity = None first.")
    check_batched(x, "calibrate_exits()")
    if not x.shape[0]:
        raise DynamicError("calibrate_exits(): x holds no sample; calibrate on validation data.")
    _check_labels(y, x, "calibrate_exits()")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise DynamicError(f"calibrate_exits(): candidates is how many thresholds to try, a "
                           f"whole number >= 2, got {candidates!r}; the default is 201.")
    was_training = model.training
    try:
        return _calibrate(model, x, y, target_accuracy, target_compute, candidates)
    finally:
        model.train(was_training)


def _check_labels(y: object, x: torch.Tensor, caller: str) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or \
            y.dtype not in (torch.int64, torch.int32):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else \
            type(y).__name__
        raise DynamicError(f"{caller}: y must be one class index (int64) per sample of x, "
                           f"shape ({x.shape[0]},), got {got}.")


def _calibrate(model: EarlyExit, x: torch.Tensor, y: torch.Tensor,
               target_accuracy: float | None, target_compute: float | None, candidates: int
               ) -> Calibration:
    target = target_accuracy if target_accuracy is not None else target_compute
    model.eval()
    with torch.no_grad():
        exits = model.all_exits(x)
    parts = model._part_macs(x[:1])
    costs = torch.tensor(list(itertools.accumulate(s + h for s, h in parts)), dtype=torch.float64)
    full = sum(s for s, _ in parts) + parts[-1][1]  # every stage, only the last head
    scores = torch.stack([_score(z / t, model.rule)
                          for z, t in zip(exits[:-1], model.temperatures, strict=True)])
    correct = torch.stack([z.argmax(-1) == y for z in exits]).to(torch.float64)  # (L, B)
    grid = [float("inf")]  # inf: nobody exits early
    if scores.numel():  # more quantiles than scores find no other threshold
        qs = torch.linspace(0, 1, min(candidates, scores.numel() + 1), dtype=torch.float64)
        values = sorted(set(torch.quantile(scores.flatten().double(), qs).tolist()))
        # Midpoints, so that no sample's own score sits on a threshold (a filtered sub-batch
        # may compute it an ulp differently), and one below all: everyone at the first exit.
        grid += [(a + b) / 2 for a, b in itertools.pairwise(values)]
        grid.append(values[0] - max(abs(values[0]), 1.0) * 1e-3)
    best = None
    for s in grid:
        passes = torch.cat([scores >= s, torch.ones_like(scores[:1], dtype=torch.bool)])
        index = passes.to(torch.int8).argmax(0)  # first exit that passes, (B,)
        acc = correct.gather(0, index[None]).mean().item()
        macs = costs[index].mean().item()
        ok = acc >= target if target_accuracy is not None else macs <= target * full
        better = best is None or (macs < best[2] if target_accuracy is not None
                                  else acc > best[1])
        if ok and better:
            best = (s, acc, macs, index)
    if best is None:
        exits_acc = [c.mean().item() for c in correct]
        raise DynamicError(
            "calibrate_exits(): no threshold reaches the target "
            + (f"accuracy {target_accuracy}; the exits reach {[round(a, 4) for a in exits_acc]}"
               if target_accuracy is not None else
               f"compute {target_compute}; the cheapest (everyone at the first exit) is "
               f"{costs[0].item() / full:.3f} of the full network")
            + "."
        )
    s, acc, macs, index = best
    threshold = _threshold_from_score(s, model.rule)
    model.set_thresholds(threshold)
    fractions = torch.bincount(index, minlength=len(exits)).double() / max(len(index), 1)
    return Calibration(threshold, acc, macs, full, tuple(fractions.tolist()))


def calibrate_temperatures(model: EarlyExit, x: torch.Tensor, y: torch.Tensor, *,
                           max_iter: int = 100) -> tuple[float, ...]:
    """Fit each early exit's temperature on validation data, and set them.

    Temperature scaling (Guo et al. 2017): for exit ``i``, the ``T`` that
    minimises the cross-entropy of ``softmax(logits / T)`` against ``y``, by
    L-BFGS on ``log T``. Early exits are often over- or under-confident in
    different measures; scaling them first makes one threshold mean the same
    confidence at every exit. Calibrate temperatures, then thresholds
    (:func:`calibrate_exits`), which reads the scaled logits.

    Returns:
        The temperatures set, one per early exit.

    Raises:
        DynamicError: ``y`` is not one class index per sample of ``x``.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> net = adaptnet.EarlyExit([nn.Linear(8, 8), nn.Linear(8, 8)], [nn.Linear(8, 3)] * 2)
        >>> temps = adaptnet.dynamic.calibrate_temperatures(net, torch.randn(64, 8),
        ...                                                 torch.randint(0, 3, (64,)))
        >>> len(temps), net.temperatures == temps
        (1, True)
    """
    check_batched(x, "calibrate_temperatures()")
    _check_labels(y, x, "calibrate_temperatures()")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            exits = model.all_exits(x)
    finally:
        model.train(was_training)
    temperatures = []
    for z in exits[:-1]:
        z = z.detach().double()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter,
                                line_search_fn="strong_wolfe")

        def nll(z: torch.Tensor = z, log_t: torch.Tensor = log_t,
                opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y.long())
            loss.backward()
            return loss

        opt.step(nll)
        temperatures.append(float(log_t.detach().exp().clamp(1e-3, 1e3)))
    model.set_temperatures(temperatures)
    return tuple(temperatures)


class AllExits(nn.Module):
    """Every exit's logits, as a plain tuple: the graph to export (``torch.onnx.export``,
    ``torch.export``) when the deployment runtime makes the exit decisions itself.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> net = adaptnet.EarlyExit([nn.Linear(4, 8), nn.Linear(8, 8)],
        ...                          [nn.Linear(8, 3), nn.Linear(8, 3)])
        >>> [z.shape for z in adaptnet.dynamic.AllExits(net)(torch.randn(2, 4))]
        [torch.Size([2, 3]), torch.Size([2, 3])]
    """

    def __init__(self, model: EarlyExit) -> None:
        super().__init__()
        if not isinstance(model, EarlyExit):
            raise DynamicError(f"AllExits: expected an EarlyExit, got {type(model).__name__}.")
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.all_exits(x))


def _threshold_from_score(score: float, rule: str) -> float:
    if score == float("inf"):  # never exit early: the strictest threshold
        return 1.0 if rule == "max_prob" else 0.0
    return min(max(score, 1e-12), 1.0) if rule == "max_prob" else max(-score, 0.0)
