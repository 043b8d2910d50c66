"""Canonical weight-shared architectures: Siamese encoder, tied autoencoder, tied LSTM LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.errors import ModelError
from adaptnet.sharing import tie

__all__ = ["LSTMLanguageModel", "Siamese", "TiedAutoencoder", "contrastive_loss", "lstm_lm",
           "siamese", "tied_autoencoder"]


class Siamese(nn.Module):
    """One encoder applied to both inputs of a pair; a head on ``|e1 - e2|`` and ``e1 * e2``.

    ``forward`` takes ``(B, 2, ...)`` pairs and returns ``(B, 2)`` logits
    (different, same). ``embed(x)`` gives the encoder's ``(B, embed)`` embeddings,
    for a contrastive loss (:func:`contrastive_loss`).

    Example:
        >>> from adaptnet.models import Siamese, siamese
        >>> isinstance(siamese(), Siamese)  # built by siamese()
        True
    """

    def __init__(self, in_features: int, hidden: int, embed: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                     nn.Linear(hidden, embed))
        self.head = nn.Linear(2 * embed, 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:  # (B, 2, ...) -> (B, 2)
        b = pair.shape[0]
        e = self.encoder(pair.flatten(0, 1)).view(b, 2, -1)  # one batched pass: (B, 2, E)
        e1, e2 = e.unbind(1)
        return self.head(torch.cat([(e1 - e2).abs(), e1 * e2], 1))


def siamese(in_features: int = 64, hidden: int = 64, embed: int = 32) -> Siamese:
    """A Siamese network for pairwise classification (same class or not).

    Example:
        >>> import torch
        >>> from adaptnet.models import siamese
        >>> net = siamese(in_features=16, embed=4)
        >>> # pairs: (B, 2, ...)
        >>> net(torch.randn(3, 2, 16)).shape, net.embed(torch.randn(3, 16)).shape
        (torch.Size([3, 2]), torch.Size([3, 4]))
    """
    return Siamese(in_features, hidden, embed)


def contrastive_loss(e1: torch.Tensor, e2: torch.Tensor, same: torch.Tensor, margin: float = 1.0
                     ) -> torch.Tensor:
    """Hadsell et al. 2006: ``same * d^2 + (1 - same) * max(0, margin - d)^2``, averaged.

    Example:
        >>> import torch
        >>> from adaptnet.models import contrastive_loss
        >>> e = torch.ones(2, 4)
        >>> # a "different" pair at distance 0 costs margin**2 / 2
        >>> round(float(contrastive_loss(e, e, torch.tensor([1.0, 0.0]))), 3)
        0.5
    """
    d = F.pairwise_distance(e1, e2)
    same = same.to(d.dtype)
    return (same * d.pow(2) + (1 - same) * F.relu(margin - d).pow(2)).mean()


class TiedAutoencoder(nn.Module):
    """``x -> sigmoid(W^T relu(W x + b) + c)``: the decoder weight is the encoder's transpose.

    ``tied=False`` gives the decoder its own weight (the baseline to compare with).

    Example:
        >>> from adaptnet.models import TiedAutoencoder, tied_autoencoder
        >>> net = tied_autoencoder(in_features=16, hidden=4)  # built by tied_autoencoder()
        >>> isinstance(net, TiedAutoencoder)
        True
    """

    def __init__(self, in_features: int, hidden: int, tied: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Linear(in_features, hidden)
        self.decoder = nn.Linear(hidden, in_features)
        if tied:
            tie(self, "decoder.weight", "encoder.weight", transform="T")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> same shape
        flat = x.flatten(1)
        return torch.sigmoid(self.decoder(torch.relu(self.encoder(flat)))).view_as(x)


def tied_autoencoder(in_features: int = 64, hidden: int = 32, tied: bool = True
                     ) -> TiedAutoencoder:
    """An autoencoder whose decoder is the encoder transposed (one weight matrix).

    ``tied=False``: the same network with a decoder weight of its own.

    Example:
        >>> import torch
        >>> from adaptnet.models import tied_autoencoder
        >>> net = tied_autoencoder(in_features=16, hidden=4)
        >>> net(torch.randn(3, 16)).shape
        torch.Size([3, 16])
    """
    return TiedAutoencoder(in_features, hidden, tied)


class LSTMLanguageModel(nn.Module):
    """Embedding, LSTM, dropout, output layer; optionally the output weight is the embedding.

    Tying (Press & Wolf 2017, Inan et al. 2017) needs ``embed_size == hidden``.

    Example:
        >>> from adaptnet.models import LSTMLanguageModel, lstm_lm
        >>> isinstance(lstm_lm(vocab_size=50), LSTMLanguageModel)  # built by lstm_lm()
        True
    """

    def __init__(self, vocab_size: int, embed_size: int, hidden: int, layers: int,
                 dropout: float, tied: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden, layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if tied:
            tie(self, "decoder.weight", "embedding.weight")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h, _ = self.lstm(self.drop(self.embedding(tokens)))
        return self.decoder(self.drop(h))


def lstm_lm(vocab_size: int = 10_000, embed_size: int = 200, hidden: int = 200, layers: int = 2,
            dropout: float = 0.2, tied: bool = True) -> LSTMLanguageModel:
    """A word- or character-level LSTM language model, with embedding/output tying by default.

    Raises:
        ModelError: ``tied`` with ``embed_size != hidden``.

    Example:
        >>> import torch, adaptnet
        >>> from adaptnet.models import lstm_lm
        >>> lm = lstm_lm(vocab_size=50, embed_size=16, hidden=16)
        >>> lm(torch.randint(0, 50, (2, 7))).shape, lm.decoder.weight is lm.embedding.weight
        (torch.Size([2, 7, 50]), True)
    """
    if tied and embed_size != hidden:
        raise ModelError(f"lstm_lm: tied=True needs embed_size == hidden (the output layer "
                         f"reuses the embedding matrix), got {embed_size} and {hidden}; set both "
                         "to one value or use tied=False.")
    return LSTMLanguageModel(vocab_size, embed_size, hidden, layers, dropout, tied)
