"""Early exit (BranchyNet: Teerapittayanon et al. 2016): leave at the first confident head.

In training every exit runs on every sample, for a weighted joint loss. In
evaluation each sample leaves at the first exit whose criterion is met, and
later stages run only on the samples still active (the batch is filtered, as
in adaptive depth). :func:`calibrate_exits` picks the threshold for a target
accuracy or a target compute on validation data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.dynamic._guards import check_batched, refuse_tracing
from adaptnet.dynamic._ledger import active_rows, count_macs
from adaptnet.dynamic._route import merge_rows
from adaptnet.errors import DynamicError

__all__ = ["Calibration", "EarlyExit", "ExitResult", "calibrate_exits"]

CRITERIA = ("max_prob", "entropy")


@dataclass(frozen=True)
class ExitResult:
    """What :class:`EarlyExit` returns.

    Attributes:
        logits: ``(B, C)`` each sample's prediction: from the exit it took
            (evaluation) or from the last exit (training).
        exit_index: ``(B,)`` int64, the exit each sample took (training: the last).
        exit_logits: training only: every exit's ``(B, C)`` logits, first to last.
        weights: the joint-loss weight of each exit.
    """

    logits: torch.Tensor
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


class EarlyExit(nn.Module):
    """Stages with an exit head after each; samples leave at the first confident exit.

    Args:
        stages: ``L`` modules applied in sequence.
        heads: ``L`` classifiers; ``heads[i]`` reads the output of ``stages[i]``.
            The last head is the final exit, taken by every remaining sample.
        criterion: ``"max_prob"`` (leave when the top softmax probability is
            ``>= threshold``) or ``"entropy"`` (leave when the softmax entropy, in
            nats, is ``<= threshold``).
        thresholds: one value for every early exit, or ``L - 1`` values.
        weights: joint-loss weight per exit (default 1 each).

    Raises:
        DynamicError: mismatched or empty stages/heads, an unknown criterion, a
            threshold out of range (max_prob: (0, 1]; entropy: >= 0), or a
            wrong number of thresholds or weights.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> net = adaptnet.EarlyExit([nn.Linear(8, 8), nn.Linear(8, 8)],
        ...                          [nn.Linear(8, 3), nn.Linear(8, 3)], thresholds=0.9).eval()
        >>> net(torch.randn(5, 8)).exit_index.shape
        torch.Size([5])
    """

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module],
                 criterion: str = "max_prob", thresholds: float | Sequence[float] = 0.9,
                 weights: Sequence[float] | None = None) -> None:
        super().__init__()
        stages, heads = list(stages), list(heads)
        if not stages or len(stages) != len(heads):
            raise DynamicError(f"EarlyExit: need one head per stage, got {len(stages)} stage(s) "
                               f"and {len(heads)} head(s).")
        if criterion not in CRITERIA:
            raise DynamicError(f"EarlyExit: criterion must be one of {CRITERIA}, got "
                               f"{criterion!r}.")
        weights = [1.0] * len(heads) if weights is None else [float(w) for w in weights]
        if len(weights) != len(heads):
            raise DynamicError(f"EarlyExit: weights needs one value per exit ({len(heads)}), got "
                               f"{len(weights)}.")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.criterion = criterion
        self.weights = tuple(weights)
        self.set_thresholds(thresholds)

    def set_thresholds(self, thresholds: float | Sequence[float]) -> None:
        """Set the early exits' thresholds (one value for all, or one per early exit)."""
        n = len(self.heads) - 1
        values = [float(thresholds)] * n if isinstance(thresholds, int | float) else \
            [float(t) for t in thresholds]
        if len(values) != n:
            raise DynamicError(f"EarlyExit: thresholds needs one value or {n} (one per early "
                               f"exit), got {len(values)}.")
        bad = [t for t in values if not (0.0 < t <= 1.0 if self.criterion == "max_prob"
                                         else t >= 0.0)]
        if bad:
            allowed = "(0, 1]" if self.criterion == "max_prob" else "[0, inf) nats"
            raise DynamicError(f"EarlyExit: {self.criterion} thresholds must lie in {allowed}, "
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
        refuse_tracing("EarlyExit in eval mode")
        check_batched(x, "EarlyExit")
        B = x.shape[0]
        ids, h, parts = torch.arange(B, device=x.device), x, []
        for i, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
            if ids.numel() == 0:
                break
            with active_rows(ids):
                h = stage(h)
                logits = head(h)
            if logits.dim() != 2:
                raise DynamicError(
                    f"EarlyExit: head {i} returned logits of shape {list(logits.shape)}; each "
                    "head must return (B, C) logits, one row per sample. Per-token (B, T, C) "
                    "exits are not supported yet: pool over T in the head (e.g. mean(1)).")
            if i == last:
                parts.append((ids, logits, i))
                break
            done = confident(logits, self.criterion, self.thresholds[i])
            if done.any():
                fin, keep = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
                parts.append((ids[fin], logits[fin], i))
                ids, h = ids[keep], h[keep]
        if not parts:  # empty batch: the final exit's shape, from zero rows
            logits = self.all_exits(x)[-1]
            return ExitResult(logits, torch.zeros(0, dtype=torch.long, device=x.device), (),
                              self.weights)
        logits, index = merge_rows([p[0] for p in parts], [p[1] for p in parts],
                                   [torch.full_like(p[0], p[2]) for p in parts])
        return ExitResult(logits, index, (), self.weights)

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


def confident(logits: torch.Tensor, criterion: str, threshold: float) -> torch.Tensor:
    """``(B,)`` bool: which rows meet the exit criterion."""
    return _score(logits, criterion) >= (threshold if criterion == "max_prob" else -threshold)


def _score(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Higher is more confident: the top probability, or minus the entropy."""
    logp = torch.log_softmax(logits, dim=-1)
    if criterion == "max_prob":
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
    """
    if (target_accuracy is None) == (target_compute is None):
        raise DynamicError("calibrate_exits(): give exactly one of target_accuracy and "
                           "target_compute.")
    target = target_accuracy if target_accuracy is not None else target_compute
    if not 0.0 < float(target) <= 1.0:
        raise DynamicError(f"calibrate_exits(): the target must lie in (0, 1], got {target!r}.")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        exits = model.all_exits(x)
    parts = model._part_macs(x[:1])
    costs = torch.tensor(list(itertools.accumulate(s + h for s, h in parts)), dtype=torch.float64)
    full = sum(s for s, _ in parts) + parts[-1][1]  # every stage, only the last head
    scores = torch.stack([_score(z, model.criterion) for z in exits[:-1]])  # (L-1, B)
    correct = torch.stack([z.argmax(-1) == y for z in exits]).to(torch.float64)  # (L, B)
    grid = [float("inf")]  # inf: nobody exits early
    if scores.numel():
        qs = torch.linspace(0, 1, candidates, dtype=torch.float64)
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
    threshold = _threshold_from_score(s, model.criterion)
    model.set_thresholds(threshold)
    model.train(was_training)
    fractions = torch.bincount(index, minlength=len(exits)).double() / max(len(index), 1)
    return Calibration(threshold, acc, macs, full, tuple(fractions.tolist()))


def _threshold_from_score(score: float, criterion: str) -> float:
    if score == float("inf"):  # never exit early: the strictest threshold
        return 1.0 if criterion == "max_prob" else 0.0
    return min(max(score, 1e-12), 1.0) if criterion == "max_prob" else max(-score, 0.0)
