"""Decoder-only language models whose tokens take their own depth (MoD, MoR, early exit)."""

from __future__ import annotations

import torch
from torch import nn

from adaptnet._renamed import renamed_arguments
from adaptnet.dynamic import (
    CausalBlock,
    DecoderCache,
    DecoderResult,
    MixtureOfDepths,
    MixtureOfRecursions,
    TokenEarlyExit,
    TokenModel,
)
from adaptnet.errors import ModelError
from adaptnet.sharing import tie

__all__ = ["Decoder", "DecoderCache", "DecoderResult", "decoder"]


class Decoder(TokenModel):
    """Token embedding, causal blocks (some may be per-token constructs), tied output head.

    A :class:`~adaptnet.dynamic.TokenModel`: each block is called as
    ``block(h, span, cache)``; with ``threshold`` the one block is a
    :class:`~adaptnet.dynamic.TokenEarlyExit` whose exits read the logits out.

    Example:
        >>> import torch
        >>> from adaptnet.dynamic import CausalBlock
        >>> from adaptnet.models import Decoder
        >>> lm = Decoder(vocab_size=20, d_model=16, blocks=[CausalBlock(16, 2)], context=32)
        >>> lm(torch.randint(0, 20, (1, 4))).output.shape, lm.head.weight is lm.embed.weight
        (torch.Size([1, 4, 20]), True)
    """

    @renamed_arguments("models.Decoder", exit_threshold="threshold", exit_rule="rule")
    def __init__(self, vocab_size: int, d_model: int, blocks: list[nn.Module],
                 context: int, threshold: float | None = None,
                 rule: str = "confidence") -> None:
        super().__init__()
        self.context, self.exits = context, threshold is not None
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        if self.exits:  # one stack whose every exit is this model's readout
            blocks = [TokenEarlyExit(blocks, self.readout, threshold, rule, d_model)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        tie(self, "head.weight", "embed.weight")
        nn.init.normal_(self.embed.weight, std=0.02)  # it is the output layer too (GPT-2's)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of states ``h``: the final norm and the output layer (tied to the embedding)."""
        return self.head(self.norm(h))

    def embed_ids(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The token embedding (positions are the blocks' rotary business)."""
        return self.embed(ids)


@renamed_arguments("models.decoder", mod_capacity="capacity", mod_every="every",
                   exit_threshold="threshold", exit_rule="rule")
def decoder(vocab_size: int = 65, d_model: int = 128, layers: int = 4, heads: int = 4,
            context: int = 256, capacity: float | None = None, every: int = 2,
            recursions: int | None = None, router: str = "expert", share: str = "cycle",
            kv: str = "cache", threshold: float | None = None,
            rule: str = "confidence") -> Decoder:
    """A decoder-only language model; with ``capacity``, every ``every``-th block is MoD.

    Pre-norm causal blocks with rotary positions, the output head tied to the
    embedding. With ``capacity`` (e.g. 0.125, the Mixture-of-Depths
    paper's), blocks ``every - 1``, ``2 * every - 1``, ... process that
    fraction of each sequence's tokens in training (top-k by a router) and the
    tokens their causal predictor picks in evaluation and decoding. With
    ``recursions`` the ``layers`` blocks are one shared stack applied up to
    that many times per token (Mixture-of-Recursions, ``router`` ``"expert"``
    or ``"token"``; ``share`` ``"cycle"`` or ``"sequence"``, ``kv`` ``"cache"``
    or ``"share"``: see :class:`~adaptnet.dynamic.MixtureOfRecursions`). With
    ``threshold`` each token leaves after the first block where the
    shared readout is that confident (per-token early exit; ``rule``
    ``"confidence"`` or ``"learned"``: see :class:`~adaptnet.dynamic.TokenEarlyExit`).

    Example:
        >>> import torch
        >>> from adaptnet.models import decoder
        >>> lm = decoder(vocab_size=20, d_model=16, heads=2, layers=2, capacity=0.5, every=2)
        >>> [type(b).__name__ for b in lm.blocks]
        ['CausalBlock', 'MixtureOfDepths']
        >>> lm(torch.randint(0, 20, (2, 8))).output.shape
        torch.Size([2, 8, 20])
    """
    if layers < 1 or every < 1:
        raise ModelError(f"decoder: layers and every must be >= 1, got layers={layers}, "
                         f"every={every}.")
    if threshold is not None and (recursions is not None or capacity is not None):
        raise ModelError("decoder: threshold (per-token early exit) goes with plain "
                         "blocks; leave out capacity and recursions.")
    if recursions is None and (share, kv) != ("cycle", "cache"):
        raise ModelError(f"decoder: share={share!r} and kv={kv!r} choose how recursions reuse "
                         "the stack; give recursions too, or leave them out.")
    if threshold is None and rule != "confidence":
        raise ModelError(f"decoder: rule={rule!r} goes with threshold; give "
                         "both, or leave rule out.")
    if threshold is not None:
        return Decoder(vocab_size, d_model, [CausalBlock(d_model, heads) for _ in range(layers)],
                       context, threshold, rule)
    if recursions is not None:
        if capacity is not None:
            raise ModelError("decoder: give capacity (Mixture-of-Depths) or recursions "
                             "(Mixture-of-Recursions), not both.")
        stack = [CausalBlock(d_model, heads) for _ in range(layers)]
        return Decoder(vocab_size, d_model, [MixtureOfRecursions(stack, recursions, d_model,
                                                                 router, share=share, kv=kv)],
                       context)
    blocks: list[nn.Module] = []
    for i in range(layers):
        block = CausalBlock(d_model, heads)
        if capacity is not None and i % every == every - 1:
            block = MixtureOfDepths(block, capacity, d_model)
        blocks.append(block)
    return Decoder(vocab_size, d_model, blocks, context)
