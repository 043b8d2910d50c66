"""adaptnet's own attention block: pre-norm, rotary positions, the block protocol."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.dynamic._attention import KVCache, Span, attend
from adaptnet.errors import ConfigError

__all__ = ["CausalBlock", "rope"]


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of ``x`` ``(B, H, T, dh)`` at ``(B, T)``
    positions: pairs of channels ``(i, i + dh/2)`` rotated by ``position * base**(-2i/dh)``.

    Example:
        >>> import torch
        >>> from adaptnet.dynamic import rope
        >>> x = torch.randn(1, 2, 3, 8)  # (batch, heads, tokens, head_dim)
        >>> rope(x, torch.arange(3).expand(1, 3)).shape
        torch.Size([1, 2, 3, 8])
        >>> torch.equal(rope(x, torch.zeros(1, 3, dtype=torch.long)), x)  # position 0: unrotated
        True
    """
    span = Span(positions, 0, positions.shape[1])
    return rotate(x, *span.rotary(x.shape[-1], x.dtype, base))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., T, dh)`` rotated by the tables ``cos`` ``(..., T, dh)`` (the angles'
    cosines, twice) and ``sin`` (their sines, negated then as they are): channel ``i``
    and ``i + dh/2`` become ``a cos - b sin`` and ``b cos + a sin``, in five operators."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x.narrow(-1, half, half), x.narrow(-1, 0, half)], dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


class CausalBlock(nn.Module):
    """A pre-norm decoder block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))``.

    Multi-head causal self-attention with rotary positions. It implements
    :class:`~adaptnet.dynamic.TokenBlock`, so every per-token construct and
    ``adaptnet.generate`` run it on any subset of a batch's tokens.

    Args:
        d_model: width; ``heads`` must divide it into an even head width.
        heads: attention heads.
        hidden: the MLP's hidden width (default ``4 * d_model``).

    Raises:
        ConfigError: widths or heads that are not positive whole numbers, or a
            width that does not split into ``heads`` even head widths.

    Example:
        >>> import torch
        >>> from adaptnet.dynamic import CausalBlock
        >>> CausalBlock(16, 2)(torch.randn(3, 5, 16)).shape
        torch.Size([3, 5, 16])
    """

    def __init__(self, d_model: int, heads: int, hidden: int | None = None) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("heads", heads), ("hidden", hidden)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"CausalBlock: {name} must be a whole number >= 1, got "
                                  f"{value!r}.")
        if d_model % heads or (d_model // heads) % 2:
            raise ConfigError(f"CausalBlock: d_model={d_model} must split into {heads} heads "
                              "of an even width (rotary embeddings rotate channel pairs).")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden or 4 * d_model), nn.GELU(),
                                 nn.Linear(hidden or 4 * d_model, d_model))

    def forward(self, x: torch.Tensor, span: Span | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``x`` ``(b, n, d)`` -> ``(b, n, d)``; ``span`` defaults to whole sequences."""
        b, n, d = x.shape
        span = Span.of(x) if span is None else span
        dh = d // self.heads
        h = self.norm1(x)
        cos, sin = span.rotary(dh, x.dtype)
        if cache is not None and not span.write:  # attends to the cache's keys: queries only
            q = F.linear(h, self.qkv.weight[:d], self.qkv.bias[:d])
            q, k, v = rotate(q.view(b, n, self.heads, dh).transpose(1, 2), cos, sin), None, None
        else:
            qkv = self.qkv(h).view(b, n, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
            qk = rotate(qkv[:2], cos, sin)  # queries and keys in one pass: (2, b, H, n, dh)
            q, k, v = qk[0], qk[1], qkv[2]
        att = attend(q, k, v, span, cache)  # (b, H, n, dh)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))

    def remember(self, x: torch.Tensor, span: Span, cache: KVCache) -> None:
        """Write the keys and values of states ``x`` ``(b, n, d)`` to ``cache``."""
        b, n, d = x.shape
        dh = d // self.heads
        kv = F.linear(self.norm1(x), self.qkv.weight[d:], self.qkv.bias[d:])
        k, v = kv.view(b, n, 2, self.heads, dh).permute(2, 0, 3, 1, 4)
        cache.write(rotate(k, *span.rotary(dh, x.dtype)), v, span)

    def new_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``length`` tokens, on this block's
        device and in its dtype."""
        w = self.qkv.weight
        return KVCache(batch, length, self.heads, w.shape[1] // self.heads, dtype=w.dtype,
                       device=w.device)
