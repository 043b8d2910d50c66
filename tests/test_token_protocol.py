"""The block and cache protocol: a user's own attention block under every per-token construct.

``PlainBlock`` below is written here in plain PyTorch, as a user would: learned
absolute positions, separate query/key/value projections without bias, a ReLU
MLP. It shares no code with adaptnet's ``CausalBlock`` beyond the protocol
(``attend`` and ``KVCache``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptnet
from adaptnet.dynamic import (
    CausalBlock,
    DynamicResult,
    KVCache,
    MixtureOfDepths,
    MixtureOfRecursions,
    Span,
    TokenBlock,
    TokenEarlyExit,
    attend,
)
from adaptnet.errors import ConfigError, DynamicError
from adaptnet.models import Decoder, decoder
from conftest import spread_routes

D, H, V, CONTEXT = 16, 2, 19, 72


class PlainBlock(nn.Module):
    """A user's causal attention block implementing adaptnet's TokenBlock protocol."""

    def __init__(self, d: int = D, heads: int = H, context: int = CONTEXT) -> None:
        super().__init__()
        self.heads = heads
        self.pos = nn.Embedding(context, d)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def split(self, t: torch.Tensor) -> torch.Tensor:  # (b, n, d) -> (b, H, n, dh)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def inputs(self, x: torch.Tensor, span: Span) -> torch.Tensor:
        return self.ln1(x) + self.pos(span.positions)

    def forward(self, x: torch.Tensor, span: Span, cache: KVCache | None = None) -> torch.Tensor:
        h = self.inputs(x, span)
        k = v = None
        if cache is None or span.write:
            k, v = self.split(self.k(h)), self.split(self.v(h))
        att = attend(self.split(self.q(h)), k, v, span, cache)
        x = x + self.out(att.transpose(1, 2).flatten(2))
        return x + self.ff(self.ln2(x))

    def remember(self, x: torch.Tensor, span: Span, cache: KVCache) -> None:
        h = self.inputs(x, span)
        cache.write(self.split(self.k(h)), self.split(self.v(h)), span)

    def new_cache(self, batch: int, length: int) -> KVCache:
        return KVCache(batch, length, self.heads, self.q.out_features // self.heads,
                       dtype=self.q.weight.dtype, device=self.q.weight.device)


def user_decoder(kind: str, seed: int = 0) -> Decoder:
    """A zoo Decoder whose blocks are PlainBlocks, under the construct ``kind``."""
    torch.manual_seed(seed)
    if kind == "mod":
        blocks = [PlainBlock(), MixtureOfDepths(PlainBlock(), 0.5, D), PlainBlock(),
                  MixtureOfDepths(PlainBlock(), 0.5, D)]
    elif kind.startswith("mor"):
        _, router, kv = kind.split("-")
        blocks = [MixtureOfRecursions([PlainBlock(), PlainBlock()], 3, D, router, kv=kv)]
    else:
        blocks = [PlainBlock() for _ in range(4)]
    rule = {"exit-confidence": "confidence", "exit-learned": "learned"}.get(kind)
    model = Decoder(V, D, blocks, CONTEXT, threshold=None if rule is None else
                    (0.9 if rule == "confidence" else 0.5), rule=rule or "confidence")
    return spread_routes(model, embed_std=0.5).eval()


USER_KINDS = ["plain", "mod", "mor-expert-cache", "mor-expert-share", "mor-token-cache",
              "mor-token-share", "exit-confidence", "exit-learned"]


@pytest.mark.parametrize("kind", USER_KINDS)
def test_every_construct_decodes_a_user_block_as_recompute(kind, device):
    model = user_decoder(kind).to(device)
    assert all(isinstance(b, TokenBlock) for b in model.modules() if isinstance(b, PlainBlock))
    prompt = torch.randint(0, V, (3, 4), device=device)
    cached = adaptnet.generate(model, prompt, 60)
    assert torch.equal(cached, adaptnet.generate(model, prompt, 60, use_cache=False))
    with torch.no_grad():
        depth = model(cached).depth
    if kind != "plain":  # the adaptive path was taken
        assert len(set(depth.flatten().tolist())) > 1, f"{kind}: every token took one depth"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", USER_KINDS)
def test_a_user_block_trains_and_padding_is_invisible(kind, training):
    """Outputs and gradients of a padded batch equal each row run alone."""
    model = user_decoder(kind).train(training)
    rows = [torch.randint(0, V, (n,)) for n in (5, 1, 7)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, 7 - len(row):], mask[i, 7 - len(row):] = row, True
    out = model(ids, mask=mask)
    params = list(model.parameters())
    got = torch.autograd.grad(out.output[mask].sum(), params, allow_unused=True)
    total = 0
    for i, row in enumerate(rows):
        alone = model(row[None])
        torch.testing.assert_close(out.output[i, mask[i]], alone.output[0], rtol=1e-5,
                                   atol=1e-5)
        # a row's mean depth counts its real tokens only: as if it ran alone
        assert out.statistics()["steps"][i] == alone.statistics()["steps"][0]
        total = total + alone.output[0].sum()
    want = torch.autograd.grad(total, params, allow_unused=True, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert any(g is not None and float(g.abs().sum()) > 0 for g, p in zip(got, params,
                                                                            strict=True)
               if isinstance(p, nn.Parameter))


def test_mixture_of_depths_on_a_user_block_equals_the_block_on_each_token_alone():
    """The oracle for any block: token i's output is the block's last output on the
    selected tokens up to i (its own plain path, no cache, no packing)."""
    torch.manual_seed(0)
    mod = MixtureOfDepths(PlainBlock(), 0.5, D).eval()
    torch.nn.init.normal_(mod.predictor[2].weight, std=3.0)
    x = torch.randn(3, 9, D)
    res = mod(x)
    keep = mod.predictor(x).squeeze(-1) > 0
    assert torch.equal(res.selected, keep) and 0 < int(keep.sum()) < keep.numel()
    want = x.clone()
    for b in range(3):
        picked = keep[b].nonzero().squeeze(1)
        for j, i in enumerate(picked.tolist()):
            sub = x[b:b + 1, picked[:j + 1]]
            done = mod.block(sub, Span.of(sub, picked[None, :j + 1]))[0, -1]
            w = torch.sigmoid(mod.router(x[b, i]))
            want[b, i] = x[b, i] + w * (done - x[b, i])
    torch.testing.assert_close(res.output, want, rtol=1e-5, atol=1e-5)


class NoRemember(nn.Module):
    def forward(self, x, span, cache=None):
        return x

    def new_cache(self, batch, length):
        return None


class WrongForward(PlainBlock):
    def forward(self, x, positions):  # the old, undocumented protocol
        return x


@pytest.mark.parametrize("make", [
    lambda b: MixtureOfDepths(b, 0.5, D),
    lambda b: MixtureOfRecursions([b], 2, D, kv="share"),
    lambda b: TokenEarlyExit([b, b], lambda h: h, 0.5),
], ids=["mod", "mor", "exit"])
def test_a_block_without_the_protocol_is_refused_naming_what_it_lacks(make):
    with pytest.raises(DynamicError, match=r"NoRemember has no remember\(x, span, cache\), so "
                       r"it cannot run as a per-token block\. Implement forward\(x, span, "
                       r"cache=None\), remember\(x, span, cache\), new_cache\(batch, length\)"):
        make(NoRemember())
    with pytest.raises(DynamicError, match=r"WrongForward.forward\(x, positions\) cannot be "
                       r"called as forward\(x, span, cache\)"):
        make(WrongForward())
    with pytest.raises(DynamicError, match=r"blocks must be nn.Modules implementing "
                       r"adaptnet.dynamic.TokenBlock, got function"):
        make(lambda x: x)


@pytest.mark.parametrize("kind", ["mod", "mor-expert-cache", "exit-learned"])
def test_results_implement_the_protocol_and_nothing_stays_on_modules(kind):
    model = user_decoder(kind).train()
    before = {id(m): dict(vars(m)) for m in model.modules()}
    out = model(torch.randint(0, V, (2, 6)))
    assert isinstance(out, DynamicResult) and out.aux_loss is not None
    for layer in out.layers:
        assert isinstance(layer, DynamicResult)
        assert layer.statistics()["depth"].shape == (2, 6)
    for m in model.modules():  # no attribute was added or replaced by the forward pass
        assert {k: id(v) for k, v in vars(m).items()} == \
            {k: id(v) for k, v in before[id(m)].items()}, type(m).__name__


# ------------------------------------------------------------------ the compute ledger

def linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear))


def test_count_macs_charges_each_token_of_mixture_of_depths_its_own_work():
    """Hand count: every token pays its predictor; a picked one its router, the block's
    projections and MLP (12 d^2) and its share of the attention among the picked (2 n d)."""
    torch.manual_seed(0)
    mod = MixtureOfDepths(CausalBlock(D, H), 0.5, D).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():  # pick tokens 1 and 4 of each row, by the predictor's bias
        nn.init.zeros_(mod.predictor[2].weight)
        mod.predictor[2].bias.fill_(-1.0)
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, [1, 4]] = True
    mod.predictor.register_forward_hook(lambda m, a, out: torch.where(keep[..., None], 1.0, -1.0))
    with torch.no_grad(), adaptnet.count_macs(batch_size=2, tokens=6) as macs:
        res = mod(x)
    assert torch.equal(res.selected, keep)
    predictor = linear_macs(mod.predictor)
    picked = mod.router.in_features + 12 * D * D + 2 * 2 * D  # n = 2 picked per row
    want = torch.where(keep, predictor + picked, predictor).double()
    torch.testing.assert_close(macs.per_token, want)
    assert macs.total == int(want.sum())
    torch.testing.assert_close(macs.per_sample, want.sum(1))


def test_count_macs_charges_recursions_and_exits_per_token():
    """MoR (token router): a token running s steps pays s times the stack. Per-token
    exit, one cached step of one token per row: its blocks, its exits' readouts, and
    the keys of its state in every block after it left."""
    torch.manual_seed(0)
    mor = MixtureOfRecursions([CausalBlock(D, H)], 3, D, router="token").eval()
    x = torch.randn(1, 4, D)
    with torch.no_grad(), adaptnet.count_macs(batch_size=1, tokens=4) as macs:
        res = mor(x)
    steps = res.depth[0]
    assert len(set(steps.tolist())) > 1, "every token ran the same number of steps"
    router = D * 3
    # step r runs the tokens with depth > r; attention at a step is among them: 2 n_r d
    counts = [int((steps > r).sum()) for r in range(3)]
    want = [router + sum(12 * D * D + 2 * counts[r] * D for r in range(int(s))) for s in steps]
    torch.testing.assert_close(macs.per_token[0], torch.tensor(want, dtype=torch.float64))

    model = decoder(vocab_size=V, d_model=D, heads=H, context=8, layers=3, threshold=0.5)
    nn.init.normal_(model.embed.weight, std=0.5)
    model.eval()
    cache = model.new_cache(2)
    with torch.no_grad():
        model(torch.randint(0, V, (2, 3)), cache=cache)
        exits = model.blocks[0]
        exits.threshold = 1e-9  # every token leaves at the first exit
        with adaptnet.count_macs(batch_size=2, tokens=1) as macs:
            out = model(torch.randint(0, V, (2, 1)), cache=cache)
    assert bool((out.depth == 1).all())
    readout = D * V
    block = 12 * D * D + 2 * 4 * D  # one query against 4 cached keys
    keys = 2 * D * D  # the state's keys and values in each later block
    want = block + readout + 2 * keys
    torch.testing.assert_close(macs.per_token, torch.full((2, 1), float(want),
                                                          dtype=torch.float64))


def test_count_macs_refuses_a_bad_token_count():
    with pytest.raises(DynamicError, match=r"tokens must be the tokens per row \(an int >= 1\), "
                       r"given with batch_size; got tokens=0"), \
            adaptnet.count_macs(batch_size=2, tokens=0):
        pass
    mod = MixtureOfDepths(CausalBlock(D, H), 0.5, D).train()
    with pytest.raises(DynamicError, match=r"count_macs\(tokens=3\): a per-token construct ran "
                       r"on sequences of 5 tokens; count with tokens=5"), \
            adaptnet.count_macs(batch_size=1, tokens=3):
        mod(torch.randn(1, 5, D))


# ------------------------------------------------------------------ deployment

@pytest.mark.slow
def test_capacity_mode_mixture_of_depths_compiles_whole_and_exports():
    """The training path (top-k, static shapes): fullgraph compile and torch.export."""
    torch.manual_seed(0)
    mod = MixtureOfDepths(CausalBlock(D, H), 0.25, D).train()
    x = torch.randn(3, 8, D)
    want = mod(x)
    got = torch.compile(mod, fullgraph=True)(x)
    torch.testing.assert_close(got.output, want.output)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    program = torch.export.export(mod, (x,))
    torch.testing.assert_close(program.module()(x).output, want.output)
    assert int(want.depth.sum()) == 3 * 2


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["cache", "share"])
def test_capacity_mode_mixture_of_recursions_compiles_whole_and_exports(kv):
    torch.manual_seed(0)
    mor = MixtureOfRecursions([CausalBlock(D, H), CausalBlock(D, H)], 3, D, kv=kv).train()
    x = torch.randn(2, 6, D)
    want = mor(x)
    got = torch.compile(mor, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got.output, want.output)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    program = torch.export.export(mor, (x,))
    torch.testing.assert_close(program.module()(x).output, want.output)


@pytest.mark.slow
def test_compiled_decoding_picks_the_same_tokens():
    """Decoding routes by host reads (one per decision): torch.compile without fullgraph
    breaks the graph there and gives the same tokens."""
    torch.manual_seed(0)
    model = decoder(vocab_size=V, d_model=D, heads=H, context=24, layers=2, capacity=0.5,
                    every=1)
    nn.init.normal_(model.embed.weight, std=0.5)
    prompt = torch.randint(0, V, (2, 3))
    assert torch.equal(adaptnet.generate(torch.compile(model), prompt, 6),
                       adaptnet.generate(model, prompt, 6))


# ------------------------------------------------------------------ bad input

def test_a_cache_of_another_model_or_batch_is_refused():
    model, other = decoder(vocab_size=V, d_model=D, heads=H, context=8, layers=1), \
        decoder(vocab_size=V, d_model=D, heads=H, context=8, layers=1)
    ids = torch.zeros(2, 3, dtype=torch.long)
    model.eval()
    with pytest.raises(ConfigError, match=r"this cache was made by another model; make one "
                       r"with this model's new_cache\(batch\)"):
        model(ids, cache=other.new_cache(2))
    with pytest.raises(ConfigError, match=r"the cache was made for a batch of 3, got ids of 2 "
                       r"rows; make one with new_cache\(2\)"):
        model(ids, cache=model.new_cache(3))
    with pytest.raises(ConfigError, match=r"a KV cache is for decoding; call model.eval\(\)"):
        model.train()(ids, cache=model.new_cache(2))
    block = CausalBlock(D, H)
    with pytest.raises(DynamicError, match=r"KVCache: made for a batch of 1, written with 2 "
                       r"rows; make the cache for this batch"):
        block(torch.randn(2, 3, D), Span.of(torch.randn(2, 3, D)), block.new_cache(1, 3))
    with pytest.raises(DynamicError, match=r"slot 3 is past the cache's 3 slots"):
        block(torch.randn(1, 4, D), Span.of(torch.randn(1, 4, D)), block.new_cache(1, 3))


def test_token_ids_outside_the_vocabulary_and_bad_blocks_are_typed_errors():
    model = decoder(vocab_size=V, d_model=D, heads=H, context=8, layers=1)
    with pytest.raises(ConfigError, match=rf"token ids must lie in \[0, {V}\) \(the "
                       rf"vocabulary\), got ids from 0 to {V}; map them"):
        model(torch.tensor([[0, V]]))
    with pytest.raises(ConfigError, match=r"got ids from -1 to 0"):
        adaptnet.generate(model, torch.tensor([[0, -1]]), 2)
    with pytest.raises(ConfigError, match=r"ids must be \(batch, tokens\) integer token ids, "
                       r"got torch.float32"):
        model(torch.zeros(1, 3))
    with pytest.raises(ConfigError, match=r"CausalBlock: heads must be a whole number >= 1, "
                       r"got 0"):
        CausalBlock(D, 0)
    with pytest.raises(ConfigError, match=r"d_model must be a whole number >= 1, got -4"):
        CausalBlock(-4, 2)
    with pytest.raises(DynamicError, match=r"MixtureOfDepths: expected token states \(B, T, d\), "
                       r"floating point, got torch.float32 \[4, 16\]"):
        MixtureOfDepths(CausalBlock(D, H), 0.5, D)(torch.randn(4, D))


@pytest.mark.parametrize("kind", [{}, {"capacity": 0.5}, {"threshold": 0.5},
                                  {"recursions": 2}], ids=["vanilla", "mod", "exit", "mor"])
def test_generate_on_a_batch_of_zero_gives_zero_rows(kind):
    model = decoder(vocab_size=V, d_model=D, heads=H, context=8, layers=2, **kind)
    for use_cache in (True, False):
        out = adaptnet.generate(model, torch.zeros(0, 3, dtype=torch.long), 4,
                                use_cache=use_cache)
        assert out.shape == (0, 7)


def test_rope_rotates_channel_pairs_by_position_times_frequency():
    """Against the formula written out: channels i and i + dh/2 rotated by p * 10000^(-i/h)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 0, 9, 1]])
    got = adaptnet.dynamic.rope(x, positions)
    want = torch.empty_like(x)
    for b in range(2):
        for t in range(5):
            for i in range(4):
                angle = float(positions[b, t]) * 10_000.0 ** (-i / 4)
                c, s = math.cos(angle), math.sin(angle)
                a, z = x[b, :, t, i], x[b, :, t, i + 4]
                want[b, :, t, i], want[b, :, t, i + 4] = a * c - z * s, a * s + z * c
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert F.cosine_similarity(got.flatten(), x.flatten(), dim=0) < 0.99


def test_the_documented_block_runs_as_written():
    """docs/dynamic.md's 'Your own attention block' example, run as a user would."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "dynamic.md").read_text()
    section = doc.split("### Your own attention block", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)[1]
    namespace: dict = {}
    exec(compile(code, "docs/dynamic.md", "exec"), namespace)
    result = namespace["result"]
    assert result.output.shape == (2, 16, 32) and result.depth.sum(1).tolist() == [4, 4]
    block = namespace["MyBlock"]()
    model = Decoder(V, 32, [block, MixtureOfDepths(namespace["MyBlock"](), 0.5, 32)], 64)
    prompt = torch.randint(0, V, (2, 3))
    assert torch.equal(adaptnet.generate(model, prompt, 8),
                       adaptnet.generate(model, prompt, 8, use_cache=False))
