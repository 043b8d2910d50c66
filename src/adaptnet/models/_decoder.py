"""Decoder-only language models whose tokens take their own depth (MoD, MoR, early exit)."""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.dynamic import (
    CausalBlock,
    MixtureOfDepths,
    MixtureOfRecursions,
    Span,
    TokenEarlyExit,
)
from adaptnet.errors import ConfigError, ModelError
from adaptnet.sharing import tie

__all__ = ["Decoder", "DecoderCache", "DecoderResult", "decoder"]


@dataclass
class DecoderCache:
    """What one decoding run keeps (:meth:`Decoder.new_cache`).

    Attributes:
        layers: what each block's ``new_cache`` made, in block order.
        batch: the rows it was made for.
        seen: the tokens fed so far, padding included (the next call's first slot).
        next: ``(B,)`` each row's next position once a call had padding; None while
            every row's next position is ``seen``.
    """

    layers: list
    batch: int
    owner: weakref.ref
    seen: int = 0
    next: torch.Tensor | None = None


@dataclass(frozen=True)
class DecoderResult:
    """What :class:`Decoder` returns (a :class:`~adaptnet.DynamicResult`).

    Attributes:
        logits: ``(B, T, V)`` next-token logits.
        aux: training: the causal predictors' loss (Mixture-of-Depths/Recursions, summed
            over blocks) or the learned exit classifiers'.
        exit_logits: training with per-token exits: every exit's logits.
        layers: the result of each per-token construct among the blocks, in order
            (:class:`~adaptnet.dynamic.TokenResult`, :class:`~adaptnet.dynamic.TokenExits`).
        blocks: the plain blocks, which every real token runs.
        mask: ``(B, T)`` the real tokens, as given to the decoder (None: all).
    """

    logits: torch.Tensor
    aux: torch.Tensor | None
    exit_logits: tuple[torch.Tensor, ...] = ()
    layers: tuple = ()
    blocks: int = 0
    mask: torch.Tensor | None = None

    @functools.cached_property
    def depth(self) -> torch.Tensor:
        """``(B, T)`` int64, the blocks each token went through (0 at padding); built when
        first read (a decoding step does not pay for it)."""
        shape = self.logits.shape[:2]
        depth = torch.full(shape, self.blocks, dtype=torch.long, device=self.logits.device) \
            if self.mask is None else self.mask.long() * self.blocks
        for layer in self.layers:
            depth = depth + layer.depth
        return depth

    @property
    def prediction(self) -> torch.Tensor:
        return self.logits

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.aux

    def task_loss(self, target: torch.Tensor, loss_fn=None, per_sample=None) -> torch.Tensor:
        """The loss of the logits (default: token cross-entropy); with exits, the mean over
        every exit's (equal weights)."""
        loss_fn = loss_fn or _token_cross_entropy
        if self.exit_logits:
            return sum(loss_fn(z, target) for z in self.exit_logits) / len(self.exit_logits)
        return loss_fn(self.logits, target)

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"steps": self.depth.float().mean(1), "depth": self.depth}


def _token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


class Decoder(nn.Module):
    """Token embedding, causal blocks (some may be per-token constructs), tied output head.

    Each block is called as ``block(h, span, cache)`` and returns the new states,
    or a :class:`~adaptnet.DynamicResult` whose ``prediction`` they are (Mixture-of-
    Depths, Mixture-of-Recursions); with ``exit_threshold`` the one block is a
    :class:`~adaptnet.dynamic.TokenEarlyExit` whose exits read the logits out.
    """

    def __init__(self, vocab_size: int, d_model: int, blocks: list[nn.Module],
                 context: int, exit_threshold: float | None = None,
                 exit_rule: str = "confidence") -> None:
        super().__init__()
        self.context, self.exits = context, exit_threshold is not None
        self.embed = nn.Embedding(vocab_size, d_model)
        if self.exits:  # one stack whose every exit is this model's readout
            blocks = [TokenEarlyExit(blocks, self.readout, exit_threshold, exit_rule, d_model)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        tie(self, "head.weight", "embed.weight")
        nn.init.normal_(self.embed.weight, std=0.02)  # it is the output layer too (GPT-2's)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of states ``h``: the final norm and the output layer (tied to the embedding)."""
        return self.head(self.norm(h))

    def new_cache(self, batch: int) -> DecoderCache:
        """An empty cache for decoding ``batch`` rows of up to ``context`` tokens."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ConfigError(f"Decoder.new_cache(): batch must be a whole number >= 0, got "
                              f"{batch!r}.")
        return DecoderCache([b.new_cache(batch, self.context) for b in self.blocks], batch,
                            weakref.ref(self))

    def forward(self, ids: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache: DecoderCache | None = None) -> DecoderResult:
        """Logits of ``ids`` ``(B, T)``; ``mask`` ``(B, T)`` bool marks the real tokens.

        Padding (``mask`` False, on either side) is invisible: no block
        processes it, no token attends to it, it takes no position (a row's
        first real token is at position 0) and its depth is 0; its logits are
        meaningless (give its targets ``-100`` so the loss ignores them). With a
        ``cache`` the call extends it; after a call with padding, later calls
        continue each row's positions (their ``mask`` may be left out).
        """
        b, t = self._check(ids, mask, cache)
        start = cache.seen if cache is not None else 0
        first = cache.next if cache is not None and cache.next is not None else start
        if mask is None and isinstance(first, int):
            positions = torch.arange(first, first + t, device=ids.device).expand(b, t)
        else:  # padding takes no position: a row's positions count its real tokens
            steps = torch.arange(t, device=ids.device) if mask is None else \
                (mask.cumsum(1) - 1).clamp(min=0)
            positions = (steps + (first if isinstance(first, int) else first[:, None])
                         ).expand(b, t)
        if cache is not None:
            cache.seen += t
            if mask is not None or cache.next is not None:
                cache.next = first + (t if mask is None else mask.sum(1))
        span = Span(positions, start, start + t, valid=mask)
        h = self._embed(ids)
        layers, plain, aux = [], 0, None
        for i, block in enumerate(self.blocks):
            out = block(h, span, None if cache is None else cache.layers[i])
            if self.exits:  # the exits read the logits out themselves
                return DecoderResult(out.logits, out.aux_loss, out.exit_logits, (out,))
            if isinstance(out, torch.Tensor):
                h, plain = out, plain + 1
                continue
            h = out.prediction
            layers.append(out)
            if out.aux_loss is not None:
                aux = out.aux_loss if aux is None else aux + out.aux_loss
        return DecoderResult(self.readout(h), aux, (), tuple(layers), plain, mask)

    def _check(self, ids: object, mask: object, cache: object) -> tuple[int, int]:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or \
                ids.dtype not in (torch.int64, torch.int32):
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else \
                type(ids).__name__
            raise ConfigError(f"Decoder: ids must be (batch, tokens) integer token ids, got "
                              f"{got}.")
        b, t = ids.shape
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or mask.shape != ids.shape):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else \
                type(mask).__name__
            raise ConfigError(f"Decoder: mask must be a bool tensor shaped like ids "
                              f"{tuple(ids.shape)} (True at real tokens), got {got}.")
        if cache is not None:
            if not isinstance(cache, DecoderCache) or cache.owner() is not self:
                raise ConfigError("Decoder: this cache was made by another model; make one "
                                  "with this model's new_cache(batch).")
            if cache.batch != b:
                raise ConfigError(f"Decoder: the cache was made for a batch of {cache.batch}, "
                                  f"got ids of {b} rows; make one with new_cache({b}).")
            if self.training:
                raise ConfigError("Decoder: a KV cache is for decoding; call model.eval() "
                                  "first.")
        start = cache.seen if cache is not None else 0
        if start + t > self.context:
            raise ConfigError(f"Decoder: a sequence of {start + t} tokens is longer than the "
                              f"model's context of {self.context}; cut it, or build the "
                              "model with a larger context.")
        return b, t

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.embed.num_embeddings
        try:
            if ids.device.type != "cpu" and ids.numel() and \
                    not bool(((ids >= 0) & (ids < vocab)).all()):  # CUDA would assert later
                raise IndexError
            return self.embed(ids)
        except IndexError:
            raise ConfigError(f"Decoder: token ids must lie in [0, {vocab}) (the vocabulary), "
                              f"got ids from {int(ids.min())} to {int(ids.max())}; map them "
                              "into the vocabulary, or build the model with a larger "
                              "vocab_size.") from None


def decoder(vocab_size: int = 65, d_model: int = 128, layers: int = 4, heads: int = 4,
            context: int = 256, mod_capacity: float | None = None, mod_every: int = 2,
            recursions: int | None = None, router: str = "expert", share: str = "cycle",
            kv: str = "cache", exit_threshold: float | None = None,
            exit_rule: str = "confidence") -> Decoder:
    """A decoder-only language model; ``mod_capacity`` makes every ``mod_every``-th block MoD.

    Pre-norm causal blocks with rotary positions, the output head tied to the
    embedding. With ``mod_capacity`` (e.g. 0.125, the Mixture-of-Depths
    paper's), blocks ``mod_every - 1``, ``2 * mod_every - 1``, ... process that
    fraction of each sequence's tokens in training (top-k by a router) and the
    tokens their causal predictor picks in evaluation and decoding. With
    ``recursions`` the ``layers`` blocks are one shared stack applied up to
    that many times per token (Mixture-of-Recursions, ``router`` ``"expert"``
    or ``"token"``; ``share`` ``"cycle"`` or ``"sequence"``, ``kv`` ``"cache"``
    or ``"share"``: see :class:`~adaptnet.dynamic.MixtureOfRecursions`). With
    ``exit_threshold`` each token leaves after the first block where the
    shared readout is that confident (per-token early exit; ``exit_rule``
    ``"confidence"`` or ``"learned"``: see :class:`~adaptnet.dynamic.TokenEarlyExit`).
    """
    if layers < 1 or mod_every < 1:
        raise ModelError(f"decoder: layers and mod_every must be >= 1, got layers={layers}, "
                         f"mod_every={mod_every}.")
    if exit_threshold is not None and (recursions is not None or mod_capacity is not None):
        raise ModelError("decoder: exit_threshold (per-token early exit) goes with plain "
                         "blocks; leave out mod_capacity and recursions.")
    if recursions is None and (share, kv) != ("cycle", "cache"):
        raise ModelError(f"decoder: share={share!r} and kv={kv!r} choose how recursions reuse "
                         "the stack; give recursions too, or leave them out.")
    if exit_threshold is None and exit_rule != "confidence":
        raise ModelError(f"decoder: exit_rule={exit_rule!r} goes with exit_threshold; give "
                         "both, or leave exit_rule out.")
    if exit_threshold is not None:
        return Decoder(vocab_size, d_model, [CausalBlock(d_model, heads) for _ in range(layers)],
                       context, exit_threshold, exit_rule)
    if recursions is not None:
        if mod_capacity is not None:
            raise ModelError("decoder: give mod_capacity (Mixture-of-Depths) or recursions "
                             "(Mixture-of-Recursions), not both.")
        stack = [CausalBlock(d_model, heads) for _ in range(layers)]
        return Decoder(vocab_size, d_model, [MixtureOfRecursions(stack, recursions, d_model,
                                                                 router, share=share, kv=kv)],
                       context)
    blocks: list[nn.Module] = []
    for i in range(layers):
        block = CausalBlock(d_model, heads)
        if mod_capacity is not None and i % mod_every == mod_every - 1:
            block = MixtureOfDepths(block, mod_capacity, d_model)
        blocks.append(block)
    return Decoder(vocab_size, d_model, blocks, context)
