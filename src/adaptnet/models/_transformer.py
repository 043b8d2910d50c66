"""Transformer encoders with shared layers: ALBERT-style sharing, a Universal Transformer."""

from __future__ import annotations

import torch
from torch import nn

from adaptnet.dynamic import ACTHalting, AdaptiveDepth, DepthResult
from adaptnet.errors import ModelError
from adaptnet.models._parts import PoolHead, SequenceInput, readout
from adaptnet.sharing import share

__all__ = ["SHARING", "SequenceEncoder", "albert_encoder", "universal_transformer"]

#: What an ALBERT encoder's layers may share: nothing, attention, feed-forward or all.
SHARING = ("none", "attention", "ffn", "all")


class SequenceEncoder(nn.Module):
    """Input embedding, ``layers`` transformer encoder layers, mean-pooled classifier.

    Example:
        >>> from adaptnet.models import SequenceEncoder, albert_encoder
        >>> isinstance(albert_encoder(), SequenceEncoder)  # built by albert_encoder()
        True
    """

    def __init__(self, inp: SequenceInput, layers: list[nn.Module], d_model: int,
                 num_classes: int) -> None:
        super().__init__()
        self.input = inp
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.head = PoolHead(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T[, F]) -> (B, num_classes)
        h = self.input(x)  # (B, T, d)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def _layer(d_model: int, heads: int, ffn: int, dropout: float) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(d_model, heads, ffn, dropout, batch_first=True,
                                      norm_first=True)


def albert_encoder(num_classes: int = 10, step_features: int = 1, vocab_size: int | None = None,
                   max_len: int = 64, embed_size: int | None = None, d_model: int = 64,
                   heads: int = 4, ffn: int = 128, layers: int = 6, dropout: float = 0.0,
                   sharing: str = "all", strategy: str = "cycle", groups: int = 1
                   ) -> SequenceEncoder:
    """A transformer encoder with ALBERT-style cross-layer sharing (Lan et al. 2020).

    Args:
        vocab_size: token inputs ``(B, T)``; without it, inputs are ``(B, T)``
            values or ``(B, T, step_features)`` vectors (e.g. MNIST-1D as a sequence).
        embed_size: ALBERT's factorised embedding width (projected to ``d_model``).
        sharing: what the layers share: ``"none"``, ``"attention"`` (the
            self-attention), ``"ffn"`` (both feed-forward linears) or ``"all"``.
        strategy, groups: with ``groups > 1``, the layers form ``groups``
            distinct blocks assigned ``"cycle"`` (0 1 2 0 1 2) or ``"sequence"``
            (0 0 1 1 2 2) (Takase & Kiyono 2021).

    Example:
        >>> import torch, adaptnet
        >>> from adaptnet.models import albert_encoder
        >>> net = albert_encoder(num_classes=3, layers=4, max_len=10)
        >>> s = adaptnet.summary(net)  # shared weights: counted once
        >>> net(torch.randn(2, 10)).shape, s.unique < s.per_use
        (torch.Size([2, 3]), True)
    """
    if sharing not in SHARING:
        raise ModelError(f"albert_encoder: sharing must be one of {', '.join(SHARING)}, got "
                         f"{sharing!r}.")
    if strategy not in ("cycle", "sequence"):
        raise ModelError(f"albert_encoder: strategy must be 'cycle' or 'sequence', got "
                         f"{strategy!r}.")
    if not 1 <= groups <= layers or layers % groups:
        raise ModelError(f"albert_encoder: groups must divide layers ({layers}), got {groups}.")
    if d_model % heads:
        raise ModelError(f"albert_encoder: d_model ({d_model}) must be divisible by heads "
                         f"({heads}).")
    inp = SequenceInput(d_model, max_len, vocab_size=vocab_size, in_features=step_features,
                        embed_size=embed_size)
    model = SequenceEncoder(inp, [_layer(d_model, heads, ffn, dropout) for _ in range(layers)],
                            d_model, num_classes)
    if sharing != "none" and groups < layers:
        how = {"blocks": groups, "strategy": strategy if groups > 1 else "all"}
        parts = {"all": [""], "attention": [".self_attn"], "ffn": [".linear1", ".linear2"]}
        for suffix in parts[sharing]:
            share(model, [f"layers.{i}{suffix}" for i in range(layers)], **how)
    return model


class UniversalTransformer(nn.Module):
    """One transformer layer applied per sample until ACT halts (Dehghani et al. 2019)."""

    def __init__(self, inp: SequenceInput, depth: AdaptiveDepth, d_model: int,
                 num_classes: int) -> None:
        super().__init__()
        self.input = inp
        self.depth = depth
        self.head = nn.Sequential(nn.LayerNorm(d_model), PoolHead(d_model, num_classes))

    def forward(self, x: torch.Tensor) -> DepthResult:  # logits (B, num_classes) in .output
        return readout(self.depth(self.input(x)), self.head)


def universal_transformer(num_classes: int = 10, step_features: int = 1,
                          vocab_size: int | None = None, max_len: int = 64, d_model: int = 64,
                          heads: int = 4, ffn: int = 128, max_steps: int = 6,
                          dropout: float = 0.0, time_penalty: float = 0.01
                          ) -> UniversalTransformer:
    """A Universal-Transformer-style encoder: ACT over one shared layer.

    Halting is per sample (the whole sequence stops together), not per
    position as in the paper; the halting unit reads the mean-pooled state.

    Example:
        >>> import torch
        >>> from adaptnet.models import universal_transformer
        >>> net = universal_transformer(num_classes=3, max_len=10, max_steps=4).eval()
        >>> r = net(torch.randn(2, 10))
        >>> r.output.shape, bool((r.steps <= 4).all())
        (torch.Size([2, 3]), True)
    """
    if d_model % heads:
        raise ModelError(f"universal_transformer: d_model ({d_model}) must be divisible by "
                         f"heads ({heads}).")
    inp = SequenceInput(d_model, max_len, vocab_size=vocab_size, in_features=step_features)
    depth = AdaptiveDepth(_layer(d_model, heads, ffn, dropout),
                          ACTHalting(PoolHead(d_model, 1), time_penalty=time_penalty), max_steps)
    return UniversalTransformer(inp, depth, d_model, num_classes)
