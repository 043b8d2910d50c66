"""A causal language model whose blocks are per-token constructs: what the zoo's
``Decoder`` and ``adaptnet.hf``'s adapted Hugging Face models share.

Embedding, a stack of :class:`~adaptnet.dynamic.TokenBlock` blocks (plain, or
Mixture-of-Depths/Recursions, or one :class:`~adaptnet.dynamic.TokenEarlyExit`
over the stack), readout. :class:`TokenModel` owns what every such model does
the same way: positions of padded rows, the cache's slots, the walk through
the blocks, the result; a subclass says how ids become states
(:meth:`TokenModel.embed_ids`) and states become logits (:meth:`TokenModel.readout`).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet._renamed import renamed_attribute
from adaptnet.dynamic._attention import Span
from adaptnet.errors import ConfigError

__all__ = ["DecoderCache", "DecoderResult", "TokenModel"]


@dataclass
class DecoderCache:
    """What one decoding run keeps (:meth:`TokenModel.new_cache`).

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
    """What a :class:`TokenModel` returns (a :class:`~adaptnet.dynamic.DynamicResult`).

    Attributes:
        output: ``(B, T, V)`` next-token logits.
        aux_loss: training: the causal predictors' loss (Mixture-of-Depths/Recursions, summed
            over blocks) or the learned exit classifiers'.
        exit_logits: training with per-token exits: every exit's logits.
        layers: the result of each per-token construct among the blocks, in order
            (:class:`~adaptnet.dynamic.TokenResult`, :class:`~adaptnet.dynamic.TokenExits`).
        blocks: the plain blocks, which every real token runs.
        mask: ``(B, T)`` the real tokens, as given to the model (None: all).
    """

    output: torch.Tensor
    aux_loss: torch.Tensor | None
    exit_logits: tuple[torch.Tensor, ...] = ()
    layers: tuple = ()
    blocks: int = 0
    mask: torch.Tensor | None = None

    @functools.cached_property
    def depth(self) -> torch.Tensor:
        """``(B, T)`` int64, the blocks each token went through (0 at padding); built when
        first read (a decoding step does not pay for it)."""
        shape = self.output.shape[:2]
        depth = torch.full(shape, self.blocks, dtype=torch.long, device=self.output.device) \
            if self.mask is None else self.mask.long() * self.blocks
        for layer in self.layers:
            depth = depth + layer.depth
        return depth

    logits = renamed_attribute("dynamic.DecoderResult", "logits", "output")
    aux = renamed_attribute("dynamic.DecoderResult", "aux", "aux_loss")
    prediction = renamed_attribute("dynamic.DecoderResult", "prediction", "output")

    def task_loss(self, target: torch.Tensor, loss_fn=None, per_sample=None) -> torch.Tensor:
        """The loss of the output logits (default: token cross-entropy); with exits, the mean over
        every exit's (equal weights)."""
        loss_fn = loss_fn or _token_cross_entropy
        if self.exit_logits:
            return sum(loss_fn(z, target) for z in self.exit_logits) / len(self.exit_logits)
        return loss_fn(self.output, target)

    def statistics(self) -> dict[str, torch.Tensor]:
        """``steps``: ``(B,)`` float, the blocks a sample's real tokens went through on
        average (padding left out); ``depth``: ``(B, T)`` int64, each token's."""
        depth = self.depth
        real = depth.shape[1] if self.mask is None else self.mask.sum(1).clamp_min(1)
        return {"steps": depth.sum(1) / real, "depth": depth}


def _token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


class TokenModel(nn.Module):
    """Token ids -> :meth:`embed_ids` -> ``blocks`` -> :meth:`readout` -> logits.

    Each block is called as ``block(h, span, cache)`` and returns the new states,
    or a :class:`~adaptnet.dynamic.DynamicResult` whose ``prediction`` they are (Mixture-of-
    Depths, Mixture-of-Recursions); with ``exits`` the one block is a
    :class:`~adaptnet.dynamic.TokenEarlyExit` whose exits read the logits out.

    Subclasses set ``blocks`` (an ``nn.ModuleList``), ``context`` (the longest
    sequence), ``exits`` and ``vocab_size``, and define :meth:`embed_ids` and
    :meth:`readout`. The model implements :class:`~adaptnet.dynamic.CachedModel`.

    Example:
        >>> import torch
        >>> from adaptnet.dynamic import TokenModel
        >>> from adaptnet.models import decoder
        >>> lm = decoder(vocab_size=20, d_model=16, heads=2, layers=2)
        >>> isinstance(lm, TokenModel), lm(torch.randint(0, 20, (2, 5))).output.shape
        (True, torch.Size([2, 5, 20]))
        >>> from adaptnet.dynamic import DecoderCache
        >>> isinstance(lm.new_cache(2), DecoderCache)  # for cached decoding (generate)
        True
    """

    blocks: nn.ModuleList
    context: int
    exits: bool
    vocab_size: int

    def embed_ids(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """States ``(B, T, d)`` of token ``ids`` at ``positions`` (both ``(B, T)``)."""
        raise NotImplementedError

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., V)`` of states ``h`` ``(..., d)``."""
        raise NotImplementedError

    def new_cache(self, batch: int) -> DecoderCache:
        """An empty cache for decoding ``batch`` rows of up to ``context`` tokens."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ConfigError(f"{type(self).__name__}.new_cache(): batch must be a whole "
                              f"number >= 0, got {batch!r}.")
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
        span = Span(positions, start, start + t, mask=mask)
        h = self._embed(ids, positions)
        layers, plain, aux = [], 0, None
        for i, block in enumerate(self.blocks):
            out = block(h, span, None if cache is None else cache.layers[i])
            if self.exits:  # the exits read the logits out themselves
                return DecoderResult(out.output, out.aux_loss, out.exit_logits, (out,),
                                     mask=mask)
            if isinstance(out, torch.Tensor):
                h, plain = out, plain + 1
                continue
            h = out.output
            layers.append(out)
            if out.aux_loss is not None:
                aux = out.aux_loss if aux is None else aux + out.aux_loss
        return DecoderResult(self.readout(h), aux, (), tuple(layers), plain, mask)

    def _check(self, ids: object, mask: object, cache: object) -> tuple[int, int]:
        name = type(self).__name__
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or \
                ids.dtype not in (torch.int64, torch.int32):
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else \
                type(ids).__name__
            raise ConfigError(f"{name}: ids must be (batch, tokens) integer token ids, got "
                              f"{got}.")
        b, t = ids.shape
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or mask.shape != ids.shape):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else \
                type(mask).__name__
            raise ConfigError(f"{name}: mask must be a bool tensor shaped like ids "
                              f"{tuple(ids.shape)} (True at real tokens), got {got}.")
        if cache is not None:
            if not isinstance(cache, DecoderCache) or cache.owner() is not self:
                raise ConfigError(f"{name}: this cache was made by another model; make one "
                                  "with this model's new_cache(batch).")
            if cache.batch != b:
                raise ConfigError(f"{name}: the cache was made for a batch of {cache.batch}, "
                                  f"got ids of {b} rows; make one with new_cache({b}).")
            if self.training:
                raise ConfigError(f"{name}: a KV cache is for decoding; call model.eval() "
                                  "first.")
        start = cache.seen if cache is not None else 0
        if start + t > self.context:
            raise ConfigError(f"{name}: a sequence of {start + t} tokens is longer than the "
                              f"model's context of {self.context}; cut it, or use a model "
                              "with a larger context.")
        return b, t

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        vocab = self.vocab_size
        try:
            if ids.device.type != "cpu" and ids.numel() and \
                    not bool(((ids >= 0) & (ids < vocab)).all()):  # CUDA would assert later
                raise IndexError
            return self.embed_ids(ids, positions)
        except IndexError:
            raise ConfigError(f"{type(self).__name__}: token ids must lie in [0, {vocab}) (the "
                              f"vocabulary), got ids from {int(ids.min())} to {int(ids.max())};"
                              " map them into the vocabulary, or use a model with a larger "
                              "vocabulary.") from None
