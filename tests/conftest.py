"""Small models shared by the tests. Everything runs on CPU in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI runs the same examples every time (reproducible); local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


class TinyLM(nn.Module):
    """Embedding -> tanh(Linear) -> head. 16,272 unique parameters when tied.

    The size matches the issue's torchinfo example: 1000*16 embedding + 16*16+16 hidden.
    """

    def __init__(self, vocab: int = 1000, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


class AE(nn.Module):
    """Autoencoder 12 -> 5 -> 12; tie decoder.weight to encoder.weight transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(12, 5)
        self.decoder = nn.Linear(5, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12) -> (B, 12)
        return self.decoder(torch.relu(self.encoder(x)))


def tied_lm(**kw) -> TinyLM:
    import adaptnet

    model = TinyLM(**kw)
    adaptnet.tie(model, "head.weight", "embed.weight")
    return model


def tied_ae() -> AE:
    import adaptnet

    model = AE()
    adaptnet.tie(model, "decoder.weight", "encoder.weight", transform="transpose")
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp():
    """The seeded 10 -> 50 -> 1 MLP the training tests use."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))


def regression_xy(n: int = 100):
    """``(inputs (n, 10), targets (n, 1))``, seeded."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 10, generator=g), torch.randn(n, 1, generator=g)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the token oracles and cache tests run: ``ADAPTNET_TEST_DEVICE`` (default cpu).

    ``ADAPTNET_TEST_DEVICE=cuda make test`` runs them on a GPU; asked for one where
    none exists, they are skipped (the rest of the suite runs on the CPU either way).
    """
    name = os.environ.get("ADAPTNET_TEST_DEVICE", "cpu")
    wanted = torch.device(name)
    if wanted.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"ADAPTNET_TEST_DEVICE={name} but no CUDA device is available")
    return wanted


def spread_routes(model: nn.Module, embed_std: float = 1.0) -> nn.Module:
    """Weights (from the global RNG) under which a decoder's tokens route, recur and leave
    differently: varied embeddings, causal predictors with large weights and no bias, a
    depth router and exit classifiers that disagree between tokens."""
    with torch.no_grad():
        nn.init.normal_(model.embed.weight, std=embed_std)
    return spread_adapters(model)


@torch.no_grad()
def spread_adapters(model: nn.Module) -> nn.Module:
    """The routing half of ``spread_routes``: causal predictors with large weights and no
    bias, a depth router and exit classifiers that disagree between tokens."""
    for m in model.modules():
        for p in [getattr(m, "predictor", None), *getattr(m, "predictors", [])]:
            if p is not None:
                nn.init.normal_(p[2].weight, std=3.0)
                nn.init.zeros_(p[2].bias)
        if hasattr(m, "depth_router"):
            nn.init.normal_(m.depth_router.weight, std=4.0)
        for c in getattr(m, "classifiers", []):
            nn.init.normal_(c.weight, std=2.0)
            nn.init.zeros_(c.bias)
    return model


def stepwise(model: nn.Module, ids: torch.Tensor, prompt: int) -> tuple[object, torch.Tensor]:
    """``(cache, logits)`` of ``ids`` ``(B, T)`` decoded with a KV cache: the first ``prompt``
    tokens in one call, then one token per call (what ``generate`` does)."""
    with torch.no_grad():
        cache = model.eval().new_cache(ids.shape[0])
        logits = [model(ids[:, :prompt], cache=cache).output]
        logits += [model(ids[:, i:i + 1], cache=cache).output for i in range(prompt, ids.shape[1])]
    return cache, torch.cat(logits, 1)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``write(name, source)``: a module of the user's in the current directory (a fresh
    one), as a script sits beside it; the modules are forgotten after the test."""
    import sys
    import textwrap

    monkeypatch.chdir(tmp_path)
    names = []

    def write(name: str, source: str):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return tmp_path

    yield write
    for name in names:
        sys.modules.pop(name, None)
