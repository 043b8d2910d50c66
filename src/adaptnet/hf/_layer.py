"""One Hugging Face decoder layer as a :class:`~adaptnet.dynamic.TokenBlock`.

The layer runs as it is, its own code called with its own arguments; adaptnet
hands it the states of the tokens of a span, their rotary tables (from the
model's own rotary module, at their positions), a mask it builds from the span,
and, as its cache, an object whose ``update`` stores the call's keys in
adaptnet's slot-addressed :class:`~adaptnet.dynamic.KVCache` and returns the
keys the call may read. transformers' own caches append per layer (one
sequence length for every row), which a layer that some tokens skip cannot
keep; this one is addressed by (row, slot), as the per-token constructs need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptnet.dynamic import KVCache, Span
from adaptnet.hf._family import Parts

__all__ = ["HFLayer"]


class _Slots:
    """What the model's attention takes for its cache (it calls ``update`` only)."""

    def __init__(self, cache: KVCache | None, span: Span) -> None:
        self.cache, self.span = cache, span

    def update(self, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:  # the call attends among its own tokens
            return k, v
        if self.span.write:
            self.cache.store(k, v, self.span)
        return self.cache.read(self.span)


class HFLayer(nn.Module):
    """A decoder layer of an unmodified transformers causal LM, run on any tokens of a batch.

    Args:
        layer: the model's layer (not copied: the model's own weights).
        parts: its model's :class:`~adaptnet.hf._family.Parts`.

    Example:
        >>> import torch, adaptnet.hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        ...     max_position_embeddings=64)
        >>> model = LlamaForCausalLM(config).eval()
        >>> ids = torch.randint(0, 50, (2, 6))
        >>> lm = adaptnet.hf.wrap(model)
        >>> type(lm.blocks[0]).__name__, lm.blocks[0].layer is model.model.layers[0]
        ('HFLayer', True)
    """

    def __init__(self, layer: nn.Module, parts: Parts) -> None:
        super().__init__()
        self.layer = layer
        # the model's own modules, reached without registering them here twice
        self._parts = parts

    def tables(self, span: Span, x: torch.Tensor) -> tuple | None:
        """The model's rotary tables ``(cos, sin)`` ``(b, n, dh)`` at the span's positions,
        made once per span and dtype."""
        rotary = self._parts.rotary
        if rotary is None:
            return None
        return span.once(("hf-rotary", x.dtype), lambda: rotary(x, span.positions))

    def forward(self, x: torch.Tensor, span: Span | None = None, cache: KVCache | None = None
                ) -> torch.Tensor:
        """``x`` ``(b, n, d)`` -> ``(b, n, d)``, the tokens of ``span`` attending causally."""
        span = Span.of(x) if span is None else span
        if cache is not None:
            if span.write:
                cache.claim(span)
            mask = cache.mask(span)
        else:
            mask = span.call_mask()
        n = x.shape[1]
        if self._parts.eager:  # eager attention adds the mask and masks nothing itself
            if mask is None and n > 1 and cache is None:
                mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                    ~mask, torch.finfo(x.dtype).min)
        kwargs = {self._parts.cache_arg: _Slots(cache, span), "attention_mask": mask}
        tables = self.tables(span, x)
        if tables is not None:
            kwargs["position_embeddings"] = tables
            kwargs["position_ids"] = span.positions
        out = self.layer(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # transformers < 5.25 gave tuples

    def remember(self, x: torch.Tensor, span: Span, cache: KVCache) -> None:
        """Write the keys and values the layer makes of states ``x`` ``(b, n, d)``."""
        k, v = self._parts.keys(self.layer, x, self.tables(span, x))
        cache.write(k, v, span)

    def new_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``length`` tokens, in the layer's dtype
        and on its device."""
        w = next(self.layer.parameters())
        return KVCache(batch, length, self._parts.kv_heads, self._parts.head_dim, dtype=w.dtype,
                       device=w.device)
