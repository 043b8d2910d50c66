"""Per-token depth: Mixture-of-Depths, and what every per-token construct shares.

A per-token construct works on ``(B, T, d)`` token states and a
:class:`~adaptnet.dynamic.Span` (positions, cache slots, padding). It runs its
block(s) on an active set of tokens (``_partition.Tokens``: gathered, packed
per row in causal order), charged to them in the compute ledger, and returns
a :class:`TokenResult`; nothing is left on the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet._renamed import renamed_attribute
from adaptnet.dynamic._attention import KVCache, Span, check_block
from adaptnet.dynamic._guards import check_tokens, refuse_tracing
from adaptnet.dynamic._ledger import charged_tokens
from adaptnet.dynamic._partition import Tokens, check_capacity, pack, token_quota
from adaptnet.dynamic._result import LossFn, export_as_pytree
from adaptnet.errors import DynamicError

__all__ = ["MixtureOfDepths", "TokenResult"]


@export_as_pytree
@dataclass(frozen=True)
class TokenResult:
    """What :class:`MixtureOfDepths` and :class:`MixtureOfRecursions` return (a
    :class:`~adaptnet.dynamic.DynamicResult`).

    Attributes:
        output: ``(B, T, d)`` the new token states.
        depth: ``(B, T)`` int64, the blocks each token went through (Mixture-of-Depths:
            0 or 1; Mixture-of-Recursions: its recursion steps times the stack's blocks).
        aux_loss: training with expert-choice routing: the causal predictors' binary
            cross-entropy against top-k membership; None otherwise.
    """

    output: torch.Tensor
    depth: torch.Tensor
    aux_loss: torch.Tensor | None = None

    hidden = renamed_attribute("dynamic.TokenResult", "hidden", "output")
    prediction = renamed_attribute("dynamic.TokenResult", "prediction", "output")

    @property
    def selected(self) -> torch.Tensor:
        """``(B, T)`` bool: the tokens processed at least once."""
        return self.depth > 0

    def task_loss(self, target: torch.Tensor, loss_fn: LossFn,
                  per_sample: LossFn | None = None) -> torch.Tensor:
        return loss_fn(self.output, target)

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"depth": self.depth}


def predictor(d_model: int) -> nn.Module:
    """A token's own guess whether top-k would pick it (a logit), for causal decoding: a
    small MLP (hidden width ``d_model // 4``)."""
    hidden = max(d_model // 4, 1)
    return nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))


def top_tokens(scores: torch.Tensor, k: int | torch.Tensor, active: torch.Tensor | None = None
               ) -> Tokens:
    """Each row's ``k`` highest ``scores`` ``(B, T)`` among ``active``, in causal order.

    ``k`` an int (no padding): a static ``(B, k)`` index, so the training path
    compiles whole. ``k`` per row (``(B,)``): padded to the largest, with ``real``.
    """
    if active is not None:
        scores = scores.masked_fill(~active, float("-inf"))
    if isinstance(k, int):
        return Tokens(None, scores.topk(k, dim=1).indices.sort(dim=1).values, None)
    t = scores.shape[1]
    top = scores.topk(int(k.max()), dim=1).indices
    real = torch.arange(top.shape[1], device=top.device) < k[:, None]
    key = torch.where(real, top, top + t).sort(dim=1).values  # the real ones first, in order
    return Tokens(None, key % t, key < t)


def bce(guess: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Binary cross-entropy of the logits ``guess`` at the real tokens (mean)."""
    if mask is None:
        return F.binary_cross_entropy_with_logits(guess, target.to(guess.dtype))
    w = mask.to(guess.dtype)
    loss = F.binary_cross_entropy_with_logits(guess, target.to(guess.dtype), weight=w,
                                              reduction="sum")
    return loss / w.sum().clamp(min=1)


def routed(tokens: Tokens, x: torch.Tensor, weight: torch.Tensor | None, router: nn.Module,
           run, span: Span, *state: object, straight: bool = False) -> torch.Tensor:
    """``x`` with its ``tokens`` moved by their router weight times ``run``'s update:
    ``x + sigmoid(score) * (run(x) - x)``, which puts the router on the gradient path.

    ``weight`` ``(B, T)``, or None to score only the gathered tokens.
    ``run(picked, span, *state)`` maps the gathered ``(b, n, d)`` tokens to new states.
    ``straight``: the weight is 1 going forward and ``sigmoid(score)``'s gradient going
    back (a straight-through estimator), so a processed token gets the block's output.
    """
    picked = tokens.gather(x)
    if not picked.shape[1]:  # rows with no real token at all
        return x
    t = x.shape[1]
    w = torch.sigmoid(charged_tokens(tokens, t, router, picked)) if weight is None else \
        tokens.gather(weight)[..., None]
    if straight:
        w = (w - w.detach()) + 1.0
    done = charged_tokens(tokens, t, run, picked, span.pack(tokens), *state)
    return tokens.scatter(x, tokens.merge(picked + w * (done - picked), picked))


def begin(what: str, x: torch.Tensor, span: Span | None, cache: object, training: bool
          ) -> Span:
    """What every per-token construct checks first: ``(B, T, d)`` states, and no cache in
    training; returns the span (default: whole sequences at positions ``0..T-1``)."""
    check_tokens(x, what)
    if cache is not None and training:
        raise DynamicError(f"{what}: a KV cache is for decoding; call model.eval() first "
                           "(training routes over whole sequences).")
    return Span.of(x) if span is None else span


def check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DynamicError(f"{what} must be a whole number >= 1, got {value!r}.")
    return value


class MixtureOfDepths(nn.Module):
    """Mixture-of-Depths (Raposo et al. 2024): a block processes a fraction of the tokens.

    Training: a linear router scores each token; per sequence the top
    ``ceil(capacity * n)`` of its ``n`` real tokens (expert choice) go through
    ``block``, in causal order with their positions, attending among themselves
    only; the rest pass by the residual. A processed token's update is scaled
    by its router weight ``sigmoid(score)``: ``x + sigmoid(s) * (block(x) - x)``.
    Without padding the shapes are static: this path compiles with
    ``fullgraph=True`` and exports.

    Top-k over a sequence needs its future tokens, so evaluation and decoding
    use the paper's second method instead: a small predictor, trained beside
    the router (on detached states, :attr:`TokenResult.aux_loss`) on whether
    each token is in the top-k, decides per token (``logit > 0``) from that
    token alone. A skipped token writes no key to the block's cache.

    At ``capacity=1`` every token is in the top-k, so evaluation runs every
    real token through the block without asking the predictor.

    Args:
        block: any :class:`~adaptnet.dynamic.TokenBlock` (e.g. a
            :class:`~adaptnet.dynamic.CausalBlock`).
        capacity: the fraction of each sequence's tokens processed, in (0, 1].
        d_model: width of the router's input.
        weight: ``"router"``: a processed token's update is scaled by its router
            weight (the paper's); ``"straight"``: by 1 going forward, with the router
            weight's gradient going back (straight-through), so a processed token
            gets exactly the block's output: a pretrained block keeps its function
            and the model at ``capacity=1`` is the model without routing
            (``adaptnet.hf`` uses this).

    Raises:
        DynamicError: a block without the protocol, a capacity outside (0, 1], an
            unknown ``weight``,
            input that is not ``(B, T, d)`` states, or a cache in training mode.

    Example:
        >>> import torch
        >>> from adaptnet.dynamic import CausalBlock, MixtureOfDepths
        >>> mod = MixtureOfDepths(CausalBlock(16, 2), capacity=0.25, d_model=16)
        >>> mod(torch.randn(2, 8, 16)).depth.sum(1).tolist()  # 2 of 8 tokens per row
        [2, 2]
    """

    def __init__(self, block: nn.Module, capacity: float, d_model: int, *,
                 weight: str = "router") -> None:
        super().__init__()
        check_block(block, "MixtureOfDepths")
        if weight not in ("router", "straight"):
            raise DynamicError(f"MixtureOfDepths: weight must be 'router' (the update scaled by "
                               f"the router weight) or 'straight' (by 1, straight-through), got "
                               f"{weight!r}.")
        self.straight = weight == "straight"
        if capacity is None:
            raise DynamicError("MixtureOfDepths: capacity is the fraction of each sequence's "
                               "tokens the block processes, in (0, 1]; got None. E.g. 0.125.")
        self.block, self.capacity = block, check_capacity(capacity, "MixtureOfDepths")
        self.router = nn.Linear(check_count(d_model, "MixtureOfDepths: d_model"), 1)
        self.predictor = predictor(d_model)

    def new_cache(self, batch: int, length: int) -> KVCache:
        """The block's cache: only the tokens that run the block write to it."""
        return self.block.new_cache(batch, length)

    def forward(self, x: torch.Tensor, span: Span | None = None, cache: KVCache | None = None
                ) -> TokenResult:
        """``x`` ``(B, T, d)`` at ``span`` (default: whole sequences at positions ``0..T-1``)."""
        span = begin("MixtureOfDepths", x, span, cache, self.training)
        b, t, _ = x.shape
        if self.training:
            weight = torch.sigmoid(self.router(x).squeeze(-1))  # (B, T)
            tokens = top_tokens(weight, token_quota(self.capacity, t, span.mask), span.mask)
            out = routed(tokens, x, weight, self.router, self.block, span, None,
                         straight=self.straight)
            selected = tokens.mask(b, t, x.device)
            aux = bce(self.predictor(x.detach()).squeeze(-1), selected, span.mask)
            return TokenResult(out, selected.long(), aux)
        refuse_tracing("MixtureOfDepths in eval mode")
        if self.capacity == 1:  # every token is in the top-k
            selected = torch.ones(b, t, dtype=torch.bool, device=x.device) \
                if span.mask is None else span.mask
            tokens = Tokens() if span.mask is None else pack(span.mask)
        else:
            selected = self.predictor(x).squeeze(-1) > 0  # (B, T): each token on its own
            if span.mask is not None:
                selected = selected & span.mask
            tokens = pack(selected)
        out = x if tokens is None else routed(tokens, x, None, self.router, self.block, span,
                                              cache, straight=self.straight)
        return TokenResult(out, selected.long())
