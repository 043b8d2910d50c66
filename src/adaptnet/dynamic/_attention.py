"""The block and cache protocol every per-token construct runs on.

A per-token construct (Mixture-of-Depths, Mixture-of-Recursions, per-token
exit) runs a block on *some* of a batch's tokens: it gathers them, packed per
row in causal order (``adaptnet.dynamic._partition.Tokens``), and tells the
block where they sit with a :class:`Span`: their positions, their cache slots,
which entries are padding, and whether their keys go into the cache. Any
attention block that implements :class:`TokenBlock` (three methods) works
with every construct and with ``adaptnet.generate``; :func:`attend` and
:class:`KVCache` do the part that depends on the span, so a block's own code
is its projections, its position encoding and its MLP.

The cache is addressed by (row, slot): slot ``s`` holds the keys of the
``s``-th token fed to the model (padding included), for the rows whose token
ran this block. A token that skipped the block leaves its slot empty, so
attention reads a slot's validity; while every row has filled every slot
(a dense model, no padding) nothing is masked and nothing is gathered.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.dynamic._partition import Tokens
from adaptnet.errors import DynamicError

__all__ = ["KVCache", "Span", "TokenBlock", "attend", "check_block"]


@dataclass(eq=False)
class Span:
    """Where the tokens of one block call sit: ``x`` is ``(b, n, d)``.

    Attributes:
        positions: ``(b, n)`` each token's position in its sequence (a row's
            first real token is at 0), for rotary or learned position encodings.
        start: the cache slot of the model call's first token (the tokens fed
            before this call, padding included).
        end: the slots in use after the call: ``start`` plus the call's length.
        rows: ``(b,)`` the batch rows the tokens belong to (the cache's rows);
            None: every row, in order.
        index: ``(b, n)`` each token's place in the model call, so its slot is
            ``start + index``; None: ``0 .. n-1`` in every row. Tokens with an
            index are packed: a row's real tokens come first, in causal order.
        mask: ``(b, n)`` bool, the real tokens; None: all are. Padding writes no
            key and no token attends to it; its output is discarded.
        write: False: attend to what the cache holds without adding keys
            (Mixture-of-Recursions' KV sharing, propagated keys).

    A token attends to the valid keys of its row at slots up to its own.
    """

    positions: torch.Tensor
    start: int
    end: int
    rows: torch.Tensor | None = None
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    write: bool = True
    _memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, x: torch.Tensor, positions: torch.Tensor | None = None,
           mask: torch.Tensor | None = None) -> Span:
        """Whole sequences ``x`` ``(B, T, ...)`` at slots ``0 .. T-1``; positions
        default to ``0 .. T-1``."""
        b, t = x.shape[:2]
        if positions is None:
            positions = torch.arange(t, device=x.device).expand(b, t)
        return cls(positions, 0, t, mask=mask)

    def pack(self, tokens: Tokens) -> Span:
        """The span of an active set of this span's tokens (gathered by ``tokens``)."""
        if tokens.dense:
            return self
        rows = tokens.rows if self.rows is None else \
            self.rows if tokens.rows is None else self.rows.index_select(0, tokens.rows)
        index = tokens.index if self.index is None else tokens.gather(self.index)
        mask = tokens.real if tokens.index is not None else \
            None if self.mask is None else tokens.gather(self.mask)
        memo = {}
        if index is None:  # whole rows keep their slots and their rows of the tables
            memo = {key: value if key == "slots" else
                    tuple(table.index_select(0, tokens.rows) for table in value)
                    for key, value in self._memo.items()}
        return Span(tokens.gather(self.positions), self.start, self.end, rows, index, mask,
                    self.write, memo)

    def once(self, key: object, make: Callable[[], Any]) -> Any:
        """``make()``, made once per span and kept with it (and with the span of whole rows
        of it, when it is a tuple of tables whose first dimension is the row): what every
        block of one call shares, such as a model's own rotary tables."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def call_mask(self) -> torch.Tensor | None:
        """Without a cache: ``(b, 1, n, n)`` bool, the tokens of the call each token attends
        to (the valid ones at or before it; padding queries: anything, their output is
        discarded), or None where that is plainly causal (no padding, or real tokens
        packed first)."""
        if self.mask is None or self.index is not None:
            return None
        n = self.mask.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=self.mask.device).tril() & \
            self.mask[:, None, :]
        return (mask | ~self.mask[:, :, None])[:, None]

    def reading(self) -> Span:
        """This span, attending to the cache without writing to it (its tables shared)."""
        return replace(self, write=False)

    def slots(self) -> torch.Tensor:
        """``(n,)`` (no ``index``) or ``(b, n)``: each token's cache slot."""
        if self.index is not None:
            return self.index + self.start
        if "slots" not in self._memo:
            n = self.positions.shape[1]
            self._memo["slots"] = torch.arange(self.start, self.start + n,
                                               device=self.positions.device)
        return self._memo["slots"]

    def rotary(self, dim: int, dtype: torch.dtype, base: float = 10_000.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding tables for these positions, each ``(b, 1, n, dim)``: the cosines of
        the ``dim/2`` angles twice, and their sines negated then as they are (what
        ``CausalBlock``'s rotation multiplies by); computed once per span and shared by
        every block that asks for the same ones."""
        key = (dim, dtype, base)
        if key not in self._memo:
            freq = _frequencies(dim // 2, base, self.positions.device)
            angle = self.positions[:, None, :, None].to(torch.float32) * freq
            cos, sin = angle.cos(), angle.sin()
            cos, sin = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
            self._memo[key] = (cos, sin) if dtype == torch.float32 else \
                (cos.to(dtype), sin.to(dtype))
        return self._memo[key]


_FREQUENCIES: dict[tuple, torch.Tensor] = {}


def _frequencies(half: int, base: float, device: torch.device) -> torch.Tensor:
    """``base ** (-i / half)`` for ``i < half``, float32: the rotary frequencies, kept per
    device (a decoding step would otherwise build them again)."""
    if torch.compiler.is_compiling():  # a traced graph computes them itself
        return base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    key = (half, base, str(device))
    if key not in _FREQUENCIES:
        _FREQUENCIES[key] = base ** (-torch.arange(half, device=device, dtype=torch.float32)
                                     / half)
    return _FREQUENCIES[key]


class KVCache:
    """The keys and values one attention layer has seen, preallocated, by (row, slot).

    Attributes:
        keys, values: ``(B, H, S + 1, dh)`` for ``S = length`` slots (the last one
            takes the writes of padding entries and is never read).
        filled: ``(B, S + 1)`` bool, the slots that hold a key (read only while
            :attr:`dense` is False).
        dense: every slot below :attr:`end` of every row holds a key (no token
            skipped the layer, no padding): attention needs no mask. A write that
            leaves a row's slot empty (a skipped token, padding, a whole call that
            skipped the layer) makes the cache sparse for good.
        end: the slots in use.

    Example:
        >>> from adaptnet.dynamic import KVCache
        >>> cache = KVCache(batch=2, length=16, heads=4, head_dim=8)
        >>> cache.keys.shape  # (batch, heads, slots + 1, head_dim): the extra slot takes padding
        torch.Size([2, 4, 17, 8])
    """

    def __init__(self, batch: int, length: int, heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                 ) -> None:
        self.batch, self.length = batch, length
        # One spare slot past the end, never read: padding entries of a packed write go there.
        self.keys = torch.zeros(batch, heads, length + 1, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.filled = torch.zeros(batch, length + 1, dtype=torch.bool, device=device)
        self.dense, self.end = True, 0

    def held(self) -> torch.Tensor:
        """``(B,)`` keys each row holds: rows differ when their tokens skipped differently."""
        if self.dense:
            return torch.full((self.batch,), self.end, dtype=torch.long, device=self.filled.device)
        return self.filled[:, :self.end].sum(1)

    def write(self, k: torch.Tensor, v: torch.Tensor, span: Span) -> None:
        """Store keys and values ``(b, H, n, dh)`` of the tokens of ``span`` at their slots."""
        self.claim(span)
        self.store(k, v, span)

    def claim(self, span: Span) -> None:
        """Mark the slots the tokens of ``span`` write as holding keys (what :meth:`write`
        records besides the keys themselves; :meth:`store` puts those in). A block that
        builds its mask before it has its keys (``adaptnet.hf`` runs a model's own
        attention) claims, reads :meth:`mask`, then stores."""
        b, n = span.positions.shape
        if span.end > self.length or (span.rows is None and b != self.batch):
            self._refuse(b, span)
        if span.start > self.end:  # calls that skipped this layer left their slots empty
            self._sparse()
        if span.rows is None and span.index is None:  # every row, consecutive slots
            if span.mask is not None or not self.dense:
                self._sparse()
                self.filled[:, span.start:span.start + n] = True if span.mask is None else \
                    span.mask
        elif span.index is None:  # whole rows, consecutive slots: a decoding step's
            self._sparse()
            at = slice(span.start, span.start + n)
            if span.mask is None:
                self.filled[:, at].index_fill_(0, span.rows, True)
            else:
                self.filled[:, at].index_copy_(0, span.rows, span.mask)
        else:
            self._sparse()
            r, s = self._places(span)
            self.filled[r, s] = True
        self.end = max(self.end, span.end)

    def store(self, k: torch.Tensor, v: torch.Tensor, span: Span) -> None:
        """Put keys and values ``(b, H, n, dh)`` at the slots :meth:`claim` marked."""
        if span.rows is None and span.index is None:
            slots = span.slots()
            self.keys.index_copy_(2, slots, k)
            self.values.index_copy_(2, slots, v)
        elif span.index is None:
            at = slice(span.start, span.start + k.shape[2])
            self.keys[:, :, at].index_copy_(0, span.rows, k)
            self.values[:, :, at].index_copy_(0, span.rows, v)
        else:
            r, s = self._places(span)
            self.keys[r, :, s] = k.transpose(1, 2)  # indexed: (b, n, H, dh)
            self.values[r, :, s] = v.transpose(1, 2)

    def _places(self, span: Span) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, 1)`` rows and ``(b, n)`` slots of a packed span's tokens (padding: the spare
        slot, written nowhere that is read); kept with the span for its store."""
        if "places" not in span._memo:
            b = span.positions.shape[0]
            rows = torch.arange(b, device=self.keys.device) if span.rows is None else span.rows
            s = span.slots()
            if span.mask is not None:  # padding points at other tokens: write it nowhere
                s = torch.where(span.mask, s, self.length)
            span._memo["places"] = (rows[:, None], s)
        return span._memo["places"]

    def read(self, span: Span) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values ``(b, H, S, dh)`` the tokens of ``span`` may attend to (up to
        ``span.end``, their rows), beside :meth:`mask`."""
        if not span.write and span.end > self.end:
            raise DynamicError(f"KVCache: a read up to slot {span.end} of a cache filled to "
                               f"{self.end}; write the keys of slots before reading them.")
        keys, values = self.keys.narrow(2, 0, span.end), self.values.narrow(2, 0, span.end)
        if span.rows is not None:
            keys, values = keys.index_select(0, span.rows), values.index_select(0, span.rows)
        return keys, values

    def mask(self, span: Span) -> torch.Tensor | None:
        """``(b|1, 1, n|1, S)`` bool, the slots each token of ``span`` attends to (its row's
        keys at slots up to its own; padding queries: anything, their output is
        discarded); None: every slot read (one token per row, a dense cache)."""
        mask = None if self.dense else self.filled.narrow(1, 0, span.end)
        if mask is not None and span.rows is not None:
            mask = mask.index_select(0, span.rows)
        if mask is not None:
            mask = mask[:, None, None, :]  # (b, 1, 1, S)
        if span.end - span.start > 1:  # several slots in this call: causal among them
            slots = span.slots()
            causal = torch.arange(span.end, device=self.filled.device) <= slots[..., None]
            causal = causal[:, None] if causal.dim() == 3 else causal  # (b|1, 1, n, S)
            mask = causal if mask is None else mask & causal
        if span.mask is not None and mask is not None:  # padding queries: anything finite
            mask = mask | ~span.mask[:, None, :, None]
        return mask

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               span: Span) -> torch.Tensor:
        """Write ``k``, ``v`` (when ``span.write``), then the attention of queries ``q``
        ``(b, H, n, dh)`` over the keys their rows hold at slots up to their own."""
        if span.write:
            self.write(k, v, span)
        keys, values = self.read(span)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask(span))

    def _refuse(self, rows: int, span: Span) -> None:
        if span.rows is None and rows != self.batch:
            raise DynamicError(f"KVCache: made for a batch of {self.batch}, written with "
                               f"{rows} rows; make the cache for this batch "
                               "(model.new_cache(batch)).")
        if span.end > self.length:
            raise DynamicError(f"KVCache: slot {span.end - 1} is past the cache's {self.length} "
                               "slots; make the cache as long as the longest sequence "
                               "(new_cache(batch, length)).")

    def _sparse(self) -> None:
        """From now on read the slots' validity (every slot written so far holds a key)."""
        if self.dense:
            self.filled[:, :self.end] = True
            self.dense = False


def attend(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, span: Span,
           cache: KVCache | None = None) -> torch.Tensor:
    """Causal attention of the tokens of ``span``: ``q``, ``k``, ``v`` ``(b, H, n, dh)`` ->
    ``(b, H, n, dh)``.

    Without a cache, each token attends to the valid tokens of the call at or
    before it; with one, ``k`` and ``v`` are first written there (unless
    ``span.write`` is False, when they may be None) and each token attends to
    the keys its row holds at slots up to its own. Blocks implementing
    :class:`TokenBlock` call this between their projections and their output.

    Example:
        >>> import torch
        >>> from adaptnet.dynamic import Span, attend
        >>> q = k = v = torch.randn(2, 4, 5, 8)  # (batch, heads, tokens, head_dim)
        >>> out = attend(q, k, v, Span.of(torch.zeros(2, 5)))  # causal, no cache
        >>> out.shape
        torch.Size([2, 4, 5, 8])
    """
    if cache is not None:
        return cache.attend(q, k, v, span)
    mask = span.call_mask()
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@runtime_checkable
class TokenBlock(Protocol):
    """What a per-token construct asks of an attention block.

    ``forward(x, span, cache=None)``: ``x`` ``(b, n, d)`` -> ``(b, n, d)``, the tokens
    of ``span`` attending causally (by :func:`attend`, with the cache when given).
    ``remember(x, span, cache)``: write the keys and values that states ``x`` make
    to ``cache`` without running the block (per-token exit propagates a token's
    state to the blocks it skips this way). ``new_cache(batch, length)``: an
    empty cache for ``batch`` rows of up to ``length`` tokens.
    """

    def forward(self, x: torch.Tensor, span: Span, cache: Any = None) -> torch.Tensor: ...

    def remember(self, x: torch.Tensor, span: Span, cache: Any) -> None: ...

    def new_cache(self, batch: int, length: int) -> Any: ...


PROTOCOL = ("forward(x, span, cache=None)", "remember(x, span, cache)",
            "new_cache(batch, length)")


def check_block(block: object, owner: str) -> None:
    """Raise a DynamicError naming the first :class:`TokenBlock` method ``block`` lacks."""
    if not isinstance(block, nn.Module):
        raise DynamicError(f"{owner}: blocks must be nn.Modules implementing "
                           f"adaptnet.dynamic.TokenBlock, got {type(block).__name__}.")
    name = type(block).__name__
    for method in PROTOCOL:
        attr = method.split("(")[0]
        if not callable(getattr(block, attr, None)):  # a user's block: name what it lacks
            raise DynamicError(
                f"{owner}: {name} has no {method}, so it cannot run as a per-token block. "
                f"Implement {', '.join(PROTOCOL)} (adaptnet.dynamic.TokenBlock; docs/dynamic.md "
                "'Your own attention block' shows one), or use adaptnet.dynamic.CausalBlock.")
    try:
        inspect.signature(block.forward).bind(None, None, None)
    except TypeError:
        raise DynamicError(
            f"{owner}: {name}.forward{inspect.signature(block.forward)} cannot be called as "
            "forward(x, span, cache); a per-token block takes the span of its tokens and an "
            "optional cache (adaptnet.dynamic.TokenBlock).") from None
