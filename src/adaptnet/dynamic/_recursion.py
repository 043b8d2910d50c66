"""Mixture-of-Recursions: one shared stack, applied per token up to R times."""

from __future__ import annotations

import torch
from torch import nn

from adaptnet._tree import STRATEGIES, layer_order, order_problem
from adaptnet.dynamic._attention import KVCache, Span, check_block
from adaptnet.dynamic._guards import refuse_tracing
from adaptnet.dynamic._partition import Tokens, pack, token_quota
from adaptnet.dynamic._tokens import (
    TokenResult,
    bce,
    begin,
    check_count,
    predictor,
    routed,
    top_tokens,
)
from adaptnet.errors import DynamicError

__all__ = ["MixtureOfRecursions"]


class MixtureOfRecursions(nn.Module):
    """Mixture-of-Recursions (Bae et al. 2025): one shared stack, applied per token up to
    ``max_recursions`` times.

    The stack's blocks are the same modules at every recursion: their weights
    are tied by reuse. Each recursion step runs ``len(blocks)`` layers on the
    tokens still going, gathered with their positions, attending among the
    tokens at that step; the others keep their state. A token's update is
    scaled by its router weight, as in :class:`MixtureOfDepths`.

    Which block each layer is follows :func:`adaptnet.share`'s strategies over
    the ``R * len(blocks)`` layers (step ``r`` runs layers ``r*L .. r*L+L-1``):
    ``"cycle"`` (blocks 0 1 0 1 for two blocks, two steps: the paper's
    recursion), ``"sequence"`` (0 0 1 1: step 0 runs block 0 twice),
    ``"cycle_rev"`` (0 1 1 0) or ``"all"`` (one block).

    Routers:
        ``"expert"``: at step ``r`` (0-based) a router per step keeps the top
            ``ceil(n * (R - r) / R)`` of a row's ``n`` tokens still going
            (hierarchical: all at step 0, fewer each step); without padding the
            shapes are static, so training compiles with ``fullgraph=True`` and
            exports. Evaluation and decoding use one causal predictor per later
            step (trained beside the routers, as MoD's), on the token alone.
        ``"token"``: one router assigns each token its depth up front (the
            argmax of ``R`` logits on its input state; weight: that depth's
            softmax probability). Causal as it stands.

    KV (``kv``): ``"cache"``, recursion-wise caching: each (step, layer) has
    its own cache, holding the keys of the tokens that ran that step;
    attention at a step is among its tokens. ``"share"``, recursive KV
    sharing: every token runs step 0, and at later steps a layer's queries
    attend to the keys and values that layer made at step 0, of every earlier
    token (one cache per layer).

    Args:
        blocks: the shared stack, each a :class:`~adaptnet.dynamic.TokenBlock`.
        max_recursions: ``R``, the most times a token goes through the stack.
        d_model: width of the routers' input.
        router: ``"expert"`` or ``"token"``.
        share: one of ``adaptnet.share``'s strategies.
        kv: ``"cache"`` or ``"share"``.

    Raises:
        DynamicError: a block without the protocol, an unknown router, strategy
            or KV mode, a strategy the stack cannot take (``"all"`` with several
            blocks), ``max_recursions < 1``, bad input, or a cache in training.

    Example:
        >>> import torch, adaptnet
        >>> from adaptnet.dynamic import CausalBlock
        >>> mor = adaptnet.MixtureOfRecursions([CausalBlock(16, 2)], max_recursions=3,
        ...     d_model=16).eval()
        >>> r = mor(torch.randn(2, 6, 16))
        >>> r.output.shape, 1 <= int(r.depth.min()) and int(r.depth.max()) <= 3
        (torch.Size([2, 6, 16]), True)
    """

    def __init__(self, blocks: nn.Module | list[nn.Module], max_recursions: int, d_model: int,
                 router: str = "expert", *, share: str = "cycle", kv: str = "cache") -> None:
        super().__init__()
        check_count(max_recursions, "MixtureOfRecursions: max_recursions")
        check_count(d_model, "MixtureOfRecursions: d_model")
        for name, value, allowed in (("router", router, ("expert", "token")),
                                     ("share", share, STRATEGIES),
                                     ("kv", kv, ("cache", "share"))):
            if value not in allowed:
                raise DynamicError(f"MixtureOfRecursions: {name} must be "
                                   f"{' or '.join(map(repr, allowed))}, got {value!r}.")
        stack = list(blocks) if isinstance(blocks, list | tuple | nn.ModuleList) else [blocks]
        if not stack:
            raise DynamicError("MixtureOfRecursions: blocks is empty; give the shared stack.")
        for block in stack:
            check_block(block, "MixtureOfRecursions")
        self.blocks = nn.ModuleList(stack)
        self.recursions, self.router_kind, self.kv = max_recursions, router, kv
        n = len(self.blocks)
        problem = order_problem(max_recursions * n, n, share)
        if problem:
            raise DynamicError(f"MixtureOfRecursions: share={share!r} over {n} blocks: "
                               f"{problem}.")
        order = layer_order(max_recursions * n, n, share)
        self.schedule = [order[r * n:(r + 1) * n] for r in range(max_recursions)]
        if router == "expert":
            self.routers = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(max_recursions))
            self.predictors = nn.ModuleList(predictor(d_model)  # none for step 0: all go
                                            for _ in range(max_recursions - 1))
        else:
            self.depth_router = nn.Linear(d_model, max_recursions)

    def new_cache(self, batch: int, length: int) -> list[KVCache]:
        """One cache per (recursion step, layer of the stack); with ``kv="share"`` per layer
        (its step-0 keys)."""
        steps = 1 if self.kv == "share" else self.recursions
        return [self.blocks[self.schedule[r][j]].new_cache(batch, length)
                for r in range(steps) for j in range(len(self.blocks))]

    def forward(self, x: torch.Tensor, span: Span | None = None,
                cache: list[KVCache] | None = None) -> TokenResult:
        """``x`` ``(B, T, d)`` at ``span`` (default: whole sequences at positions ``0..T-1``);
        padding (``span.mask`` False) is never processed, attended to or counted."""
        span = begin("MixtureOfRecursions", x, span, cache, self.training)
        b, t, _ = x.shape
        top_k = self.training and self.router_kind == "expert"
        if not top_k:
            refuse_tracing("MixtureOfRecursions with causal routing")
        first = None  # recursive sharing: step 0's keys, from the cache or kept for this pass
        if self.kv == "share":
            first = cache if cache is not None else self.new_cache(b, span.end)
        depth = torch.zeros(b, t, dtype=torch.long, device=x.device)
        going: Tokens | None = Tokens() if span.mask is None else pack(span.mask)
        still, aux, weight = span.mask, None, None
        if self.router_kind == "token":  # every depth chosen up front, from the input state
            weight, chosen = torch.softmax(self.depth_router(x), dim=-1).max(-1)
        for r in range(self.recursions):
            if going is None:
                break
            if top_k:  # the top tokens of those still going, hierarchically
                weight = torch.sigmoid(self.routers[r](x).squeeze(-1))
                going = top_tokens(weight, token_quota((self.recursions - r) / self.recursions,
                                                       t, span.mask), still)
                still = going.mask(b, t, x.device)
                if r:
                    loss = bce(self.predictors[r - 1](x.detach()).squeeze(-1), still, span.mask)
                    aux = loss if aux is None else aux + loss
            elif r and self.router_kind == "token":
                going = going.narrow(going.gather(chosen) >= r)
            elif r:  # step 0 takes every token, as in training
                going = going.narrow(self.predictors[r - 1](going.gather(x)).squeeze(-1) > 0)
            if going is None:
                break
            router = self.routers[r] if self.router_kind == "expert" else None
            x = routed(going, x, weight, router, self._stack, span, r, cache, first)
            going.fill(depth, r + 1)
        return TokenResult(x, depth * len(self.blocks), aux)

    def _stack(self, h: torch.Tensor, span: Span, r: int, cache: list[KVCache] | None,
               first: list[KVCache] | None) -> torch.Tensor:
        """Step ``r``'s layers on the gathered tokens ``h`` ``(b, n, d)``."""
        n = len(self.blocks)
        for j, which in enumerate(self.schedule[r]):
            if first is not None:  # step 0 writes the keys; later steps attend to them
                h = self.blocks[which](h, span if r == 0 else span.reading(), first[j])
            else:
                h = self.blocks[which](h, span, None if cache is None else cache[r * n + j])
        return h
