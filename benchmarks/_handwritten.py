"""Decoding written by hand on a zoo decoder's weights: the baselines adaptnet is held to.

What a PyTorch engineer would write for greedy KV-cache decoding of
``adaptnet.models.decoder`` without adaptnet, in the style of gpt-fast: a
module per block calling the zoo block's own layers (so hooks and swapped-in
layers keep working, as in adaptnet), one preallocated ``(B, H, context, dh)``
key and value cache per block, rotary tables computed once for the whole
context, queries and keys rotated in one pass by Hugging Face's
``rotate_half`` formula (7 operators; adaptnet's block takes 5, with one
``addcmul``), and ``scaled_dot_product_attention`` over the filled part of the
cache (no mask when every slot is filled).

``HandDecoder`` decodes the plain decoder. ``HandDecoder(mod=True)`` decodes
Mixture-of-Depths blocks as the paper's causal predictor routes them at
inference: per step one predictor logit per row; the rows whose token is
picked run the block (gathered with ``nonzero``), write their keys at this
step's slot and attend to the slots their row filled (a per-row validity
mask); the others pass by. A prompt is prefilled with the block run on every
token and a mask (cheap for a short prompt; the keys of skipped tokens are
marked invalid, so the results equal the per-token rule). Tested to pick the
same tokens as ``adaptnet.generate`` (``tests/test_decode_speed.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.dynamic import MixtureOfDepths


class Rotary:
    """Rotary tables for every position of the context, sliced per step."""

    def __init__(self, head_dim: int, context: int) -> None:
        half = head_dim // 2
        freq = 10_000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
        angle = torch.arange(context, dtype=torch.float32)[:, None] * freq
        angle = torch.cat([angle, angle], -1)
        self.cos, self.sin, self.half = angle.cos(), angle.sin(), half  # (context, dh)

    def __call__(self, x: torch.Tensor, p: int) -> torch.Tensor:  # (..., t, dh) at p..
        """``x * cos + rotate_half(x) * sin``, as Hugging Face's Llama writes it."""
        t = x.shape[-2]
        rotated = torch.cat([-x[..., self.half:], x[..., :self.half]], dim=-1)
        return x * self.cos[p:p + t] + rotated * self.sin[p:p + t]


class HandBlock(nn.Module):
    """One zoo ``CausalBlock``'s computation with a preallocated cache."""

    def __init__(self, block: nn.Module, rotary: Rotary) -> None:
        super().__init__()
        self.blk, self.rotary, self.heads = block, rotary, block.heads

    def attention(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention sublayer on ``x`` ``(B, t, d)`` at positions ``p..``."""
        B, t, d = x.shape
        qkv = self.blk.qkv(self.blk.norm1(x)).view(
            B, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, t, dh)
        qk = self.rotary(qkv[:2], p)  # queries and keys rotated in one pass
        q, k, v = qk[0], qk[1], qkv[2]
        k_cache[:, :, p:p + t] = k
        v_cache[:, :, p:p + t] = v
        keys, values = k_cache[:, :, :p + t], v_cache[:, :, :p + t]
        if mask is None and t > 1:  # prefill from an empty cache
            att = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return x + self.blk.proj(att.transpose(1, 2).reshape(B, t, d))

    def forward(self, x: torch.Tensor, cache: tuple, p: int) -> torch.Tensor:
        x = self.attention(x, cache[0], cache[1], p)
        return x + self.blk.mlp(self.blk.norm2(x))


class HandMoDBlock(HandBlock):
    """A zoo ``MixtureOfDepths`` block, routed by its causal predictor, by hand."""

    def __init__(self, mod: MixtureOfDepths, rotary: Rotary) -> None:
        super().__init__(mod.block, rotary)
        self.mod = mod

    def forward(self, x: torch.Tensor, cache: tuple, p: int) -> torch.Tensor:
        k_cache, v_cache, filled = cache
        t = x.shape[1]
        picked = self.mod.predictor(x)[..., 0] > 0  # (B, t)
        filled[:, p:p + t] = picked
        if t > 1:  # prefill: every token through the block, only the picked ones kept
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            mask = (filled[:, None, :p + t] & causal) | ~picked[:, :, None]
            done = self.attention(x, k_cache, v_cache, p, mask[:, None])
            done = done + self.blk.mlp(self.blk.norm2(done))
            w = torch.sigmoid(self.mod.router(x))
            return torch.where(picked[..., None], x + w * (done - x), x)
        rows = picked[:, 0].nonzero().squeeze(1)
        if not len(rows):
            return x
        xs = x[rows]
        kr, vr = k_cache[rows, :, :p + 1], v_cache[rows, :, :p + 1]  # the rows' filled part
        done = self.attention(xs, kr, vr, p, filled[rows, None, None, :p + 1])
        done = done + self.blk.mlp(self.blk.norm2(done))
        k_cache[rows, :, p], v_cache[rows, :, p] = kr[:, :, p], vr[:, :, p]
        w = torch.sigmoid(self.mod.router(xs))
        return x.index_copy(0, rows, xs + w * (done - xs))


class HandDecoder(nn.Module):
    """Greedy decoding of a zoo decoder (plain, or with ``MixtureOfDepths`` blocks), by hand."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model.eval()
        first = model.blocks[0]
        heads = (first.block if isinstance(first, MixtureOfDepths) else first).heads
        d = model.embed.embedding_dim
        self.shape = (heads, model.context, d // heads)
        rotary = Rotary(d // heads, model.context)
        self.layers = nn.ModuleList(
            HandMoDBlock(b, rotary) if isinstance(b, MixtureOfDepths) else HandBlock(b, rotary)
            for b in model.blocks)

    def new_caches(self, B: int) -> list[tuple]:
        return [(torch.zeros(B, *self.shape), torch.zeros(B, *self.shape))
                + ((torch.zeros(B, self.shape[1], dtype=torch.bool),)
                   if isinstance(layer, HandMoDBlock) else ())
                for layer in self.layers]

    def forward(self, ids: torch.Tensor, caches: list[tuple], p: int) -> torch.Tensor:
        x = self.m.embed(ids)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, cache, p)
        return self.m.head(self.m.norm(x[:, -1]))  # (B, V): the next token's logits

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int,
                 feed: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy tokens after ``prompt`` ``(B, T)``; ``feed`` ``(B, new_tokens)`` feeds those
        tokens instead of the greedy ones (teacher forcing: the same work per step)."""
        caches, ids = self.new_caches(prompt.shape[0]), prompt
        step, p = prompt, 0
        for i in range(new_tokens):
            nxt = self(step, caches, p).argmax(-1, keepdim=True)
            p += step.shape[1]
            ids = torch.cat([ids, nxt], dim=1)
            step = nxt if feed is None else feed[:, i:i + 1]
        return ids
