"""Per-token early exit over causal blocks (CALM), with propagated keys."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet._renamed import renamed_attribute
from adaptnet.dynamic._attention import KVCache, Span, check_block
from adaptnet.dynamic._guards import refuse_tracing
from adaptnet.dynamic._ledger import charged_tokens
from adaptnet.dynamic._partition import Tokens, pack
from adaptnet.dynamic._result import LossFn, export_as_pytree
from adaptnet.dynamic._tokens import bce, begin, check_count
from adaptnet.errors import DynamicError

__all__ = ["TokenEarlyExit", "TokenExits"]


@export_as_pytree
@dataclass(frozen=True)
class TokenExits:
    """What :class:`TokenEarlyExit` returns (a :class:`~adaptnet.dynamic.DynamicResult`).

    Attributes:
        output: ``(B, T, V)`` each token's logits, from the exit it took
            (training: from the last block); zero at padding.
        depth: ``(B, T)`` int64, blocks each token went through (0 at padding).
        exit_logits: training only: every exit's logits, first block to last.
        aux_loss: training with ``rule="learned"``: the exit classifiers' loss.
    """

    output: torch.Tensor
    depth: torch.Tensor
    exit_logits: tuple[torch.Tensor, ...] = ()
    aux_loss: torch.Tensor | None = None

    logits = renamed_attribute("dynamic.TokenExits", "logits", "output")
    prediction = renamed_attribute("dynamic.TokenExits", "prediction", "output")

    def task_loss(self, target: torch.Tensor, loss_fn: LossFn = F.cross_entropy,
                  per_sample: LossFn | None = None) -> torch.Tensor:
        """Training: the mean of every exit's ``loss_fn`` (equal weights); else the output's."""
        if self.exit_logits:
            return sum(loss_fn(z, target) for z in self.exit_logits) / len(self.exit_logits)
        return loss_fn(self.output, target)

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"depth": self.depth}


class TokenEarlyExit(nn.Module):
    """Per-token early exit over causal blocks (CALM: Schuster et al. 2022).

    After each block but the last, ``head`` (e.g. the final norm and the output
    layer tied to the embedding: every exit shares it) reads each token still
    going; a token leaves when its confidence reaches ``threshold``. Training
    runs every block on every token and returns every exit's logits (for a
    joint loss).

    Confidence (``rule``): ``"confidence"``, the exit's top softmax
    probability; ``"learned"``, a linear classifier per exit on the token's
    state (CALM's early-exit classifier), trained beside the model (on
    detached states, :attr:`TokenExits.aux_loss`) to predict whether the exit's
    top token is the last block's. With ``"learned"`` the head reads every
    token out once, from the state it left with, after the last block: one
    head call per call of the stack, whatever the exits taken (with a large
    vocabulary the head costs several blocks, and in a decoding step each
    call reads all its weights).

    Keys for the blocks a token skips come by state propagation: its state
    when it left stands for it in every later block, whose key and value
    projections (only: the block's ``remember``) are applied to it, so later
    tokens attend to every earlier token at every block. Decoding with a KV
    cache writes those keys for every later block when the token leaves, also
    when no token of the call goes on; recomputing the whole sequence gives the
    same keys.

    Args:
        blocks: the stack, each a :class:`~adaptnet.dynamic.TokenBlock`.
        head: maps states ``(..., d)`` to logits ``(..., V)``; not a submodule
            here (it belongs to the model that passes it).
        threshold: the confidence to leave at, in (0, 1]; ``math.inf``: never (every
            token runs every block; a softmax can round to exactly 1.0, so 1.0 is not
            "never").
        rule: ``"confidence"`` or ``"learned"``.
        d_model: the states' width; needed by ``rule="learned"``.

    Raises:
        DynamicError: a block without the protocol, a threshold outside (0, 1],
            an unknown rule, ``rule="learned"`` without ``d_model``, bad input, or
            a cache in training mode.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> from adaptnet.dynamic import CausalBlock
        >>> head = nn.Linear(16, 11)  # each exit reads its states out through the model's head
        >>> tee = adaptnet.TokenEarlyExit([CausalBlock(16, 2) for _ in range(3)], head,
        ...     threshold=0.5).eval()
        >>> r = tee(torch.randn(2, 5, 16))
        >>> r.output.shape, r.depth.shape
        (torch.Size([2, 5, 11]), torch.Size([2, 5]))
    """

    def __init__(self, blocks: list[nn.Module], head: Callable[[torch.Tensor], torch.Tensor],
                 threshold: float, rule: str = "confidence", d_model: int | None = None) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or \
                not (0.0 < threshold <= 1.0 or threshold == math.inf):
            raise DynamicError(f"TokenEarlyExit: threshold is the confidence to leave at, in "
                               f"(0, 1], or math.inf for never; got {threshold!r}.")
        if rule not in ("confidence", "learned"):
            raise DynamicError(f"TokenEarlyExit: rule must be 'confidence' (top softmax "
                               f"probability) or 'learned' (a classifier per exit), got {rule!r}.")
        if rule == "learned" and not isinstance(d_model, int):
            raise DynamicError("TokenEarlyExit: rule='learned' needs d_model (the width of the "
                               f"states its classifiers read), got d_model={d_model!r}.")
        if not blocks:
            raise DynamicError("TokenEarlyExit: blocks is empty; give the stack.")
        for block in blocks:
            check_block(block, "TokenEarlyExit")
        self.blocks, self.threshold, self.rule = nn.ModuleList(blocks), float(threshold), rule
        if rule == "learned":
            check_count(d_model, "TokenEarlyExit: d_model")
            self.classifiers = nn.ModuleList(nn.Linear(d_model, 1)
                                             for _ in range(len(blocks) - 1))
        self._head = head

    def new_cache(self, batch: int, length: int) -> list[KVCache]:
        return [b.new_cache(batch, length) for b in self.blocks]

    def confidence(self, i: int, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Exit ``i``'s confidence in its prediction ``logits`` of states ``h``, in [0, 1]."""
        if self.rule == "learned":
            return torch.sigmoid(self.classifiers[i](h).squeeze(-1))
        if logits.dtype != torch.float32:
            logits = logits.float()
        return torch.softmax(logits, -1).amax(-1)

    def forward(self, x: torch.Tensor, span: Span | None = None,
                cache: list[KVCache] | None = None) -> TokenExits:
        """``x`` ``(B, T, d)`` at ``span`` (default: whole sequences at positions ``0..T-1``);
        padding is never processed or attended to; its logits are zero and its depth 0."""
        span = begin("TokenEarlyExit", x, span, cache, self.training)
        b, t, _ = x.shape
        if self.training:
            return self._train(x, span)
        refuse_tracing("TokenEarlyExit in eval mode")
        everyone = Tokens() if span.mask is None else pack(span.mask)  # the real tokens
        active, left = everyone, False
        depth = torch.zeros(b, t, dtype=torch.long, device=x.device)
        logits, last = None, len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if active is None and cache is None:
                break
            memory = None if cache is None else cache[i]
            if left:  # some token left: every token's keys come from its state, in one call
                memory = self._remember(block, x, span, everyone, active, memory)
            if active is None:
                continue  # no token goes on; the later blocks still need the keys
            picked = active.gather(x)
            sub = span.pack(active)
            if left:  # the keys are in: the tokens still going only read them
                sub = replace(sub, rows=sub.rows if cache is not None else None, write=False)
            done = charged_tokens(active, t, block, picked, sub, memory)
            x = active.scatter(x, active.merge(done, picked))
            active.fill(depth, i + 1)
            if self.rule == "learned":  # the classifiers decide on the states; the head
                if i == last:           # reads every token out once, after the loop
                    break
                stay = charged_tokens(active, t, self.confidence, i, done, None) < \
                    self.threshold
                going = active.narrow(stay)
                left, active = left or going is not active, going
                continue
            out = charged_tokens(active, t, self._head, done)  # (b, n, V)
            # Every exit writes its tokens' logits; a later exit overwrites those that go on.
            logits = self._write(logits, active, out, b, t)
            if i == last:
                break
            stay = charged_tokens(active, t, self.confidence, i, done, out) < self.threshold
            going = active.narrow(stay)
            left, active = left or going is not active, going
        if self.rule == "learned" and everyone is not None:  # each token's state at its exit
            out = charged_tokens(everyone, t, self._head, everyone.gather(x))
            logits = self._write(None, everyone, out, b, t)
        if logits is None:  # no real token at all
            empty = self._head(x[:, :0])
            logits = empty.new_zeros(b, t, empty.shape[-1])
        return TokenExits(logits, depth)

    @staticmethod
    def _write(logits: torch.Tensor | None, tokens: Tokens, out: torch.Tensor, b: int, t: int
               ) -> torch.Tensor:
        """``logits`` ``(B, T, V)`` with the entries of ``tokens`` set to ``out``."""
        if logits is None and not tokens.dense:
            logits = out.new_zeros(b, t, out.shape[-1])
        return tokens.scatter(logits, tokens.merge(out, None if tokens.real is None
                                                   else tokens.gather(logits)))

    @staticmethod
    def _remember(block: nn.Module, x: torch.Tensor, span: Span, everyone: Tokens | None,
                  active: Tokens | None, cache: KVCache | None) -> KVCache | None:
        """The keys and values of every real token's current state (the state it left
        with, for a token that left) written by ``block.remember``: into ``cache`` for
        every row (later steps need them), or without a cache into a memory for the rows
        with a token still going; returns where they went."""
        if cache is None:
            if active is None:
                return None
            whole = Tokens(active.rows)
            sub = span.pack(whole)
            sub = replace(sub, rows=None)  # the memory's own rows, the same tables
            cache = block.new_cache(sub.positions.shape[0], span.end)
        elif everyone is None:
            return cache
        else:
            whole, sub = everyone, span.pack(everyone)
        charged_tokens(whole, x.shape[1], block.remember, whole.gather(x), sub, cache)
        return cache

    def _train(self, x: torch.Tensor, span: Span) -> TokenExits:
        """Every block on every token; every exit's logits, for the joint loss."""
        exits, states = [], []
        for block in self.blocks:
            x = block(x, span, None)
            states.append(x)
            exits.append(self._head(x))
        depth = torch.full(x.shape[:2], len(self.blocks), dtype=torch.long, device=x.device)
        if span.mask is not None:
            depth = depth * span.mask
        aux = None
        if self.rule == "learned":  # does exit i already say what the last block says?
            final = exits[-1].detach().argmax(-1)
            aux = sum(bce(c(h.detach()).squeeze(-1), z.detach().argmax(-1) == final, span.mask)
                      for c, h, z in zip(self.classifiers, states, exits, strict=False))
        return TokenExits(exits[-1], depth, tuple(exits), aux)
