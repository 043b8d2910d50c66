"""Cached decoding equals full recompute, for every per-token construct.

Every test here decodes with weights under which tokens do skip blocks, recur
and leave early, and asserts that they did: a cache test where every token
takes the same path proves nothing about the cache.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptnet
from adaptnet.dynamic import CausalBlock, Span
from adaptnet.models import build, decoder
from conftest import spread_routes, stepwise

V = 23
KINDS = {  # the construct, at 3-6 blocks of depth
    "vanilla": {"layers": 3},
    "mod": {"layers": 4, "capacity": 0.5, "every": 2},
    "mod-every-block": {"layers": 3, "capacity": 0.5, "every": 1},
    "mor-expert-cache": {"layers": 2, "recursions": 3},
    "mor-expert-share": {"layers": 2, "recursions": 3, "kv": "share", "share": "sequence"},
    "mor-token-cache": {"layers": 2, "recursions": 3, "router": "token"},
    "mor-token-share": {"layers": 3, "recursions": 2, "router": "token", "kv": "share"},
    "exit-confidence": {"layers": 5, "threshold": 0.9},
    "exit-learned": {"layers": 4, "threshold": 0.5, "rule": "learned"},
}


def make(kind: str, device: torch.device, seed: int = 0, context: int = 72) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = decoder(vocab_size=V, d_model=16, heads=2, context=context, **KINDS[kind])
    return spread_routes(model, embed_std=0.5).to(device).eval()


def left_padded(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(lengths)
    ids = torch.randint(0, V, (len(lengths), t), device=device)
    mask = torch.arange(t, device=device) >= t - torch.tensor(lengths, device=device)[:, None]
    return ids, mask


def assert_adaptive(kind: str, depth: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """The decoded sequence really took the construct's adaptive paths."""
    real = depth if mask is None else depth[mask]
    if kind == "vanilla":
        assert bool((real == KINDS[kind]["layers"]).all())
        return
    full = KINDS[kind]["layers"] * KINDS[kind].get("recursions", 1)
    assert int(real.min()) < full, f"{kind}: no token skipped, stopped or left early"
    assert len(set(real.flatten().tolist())) > 1, f"{kind}: every token took the same depth"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_sixty_cached_tokens_equal_full_recompute(kind, batch, device):
    model = make(kind, device)
    prompt = torch.randint(0, V, (batch, 4), device=device)
    cached = adaptnet.generate(model, prompt, 60)
    assert torch.equal(cached, adaptnet.generate(model, prompt, 60, use_cache=False))
    # Greedy decoding of random weights soon repeats a token; a varied sequence, decoded a
    # token at a time, routes every way: every step's logits against one pass.
    ids = torch.randint(0, V, (batch, 64), device=device)
    _, logits = stepwise(model, ids, 4)
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(logits, full.output, rtol=1e-4, atol=1e-4)
    assert_adaptive(kind, full.depth)


@pytest.mark.parametrize("kind", list(KINDS))
def test_left_padded_prompts_decode_as_recompute_for_sixty_tokens(kind, device):
    model = make(kind, device, seed=1)
    ids, mask = left_padded([3, 1, 6], device)
    cached = adaptnet.generate(model, ids, 60, prompt_mask=mask)
    assert torch.equal(cached, adaptnet.generate(model, ids, 60, prompt_mask=mask,
                                                 use_cache=False))
    with torch.no_grad():
        full = model(cached, mask=torch.cat([mask, torch.ones_like(cached[:, 6:],
                                                                   dtype=torch.bool)], 1))
    assert_adaptive(kind, full.depth, full.depth > 0)
    alone = adaptnet.generate(model, ids[1:2, -1:], 60)  # the one-token prompt, unpadded
    assert torch.equal(cached[1, 5:], alone[0])


def test_per_token_exit_decodes_as_recompute_after_no_token_goes_on():
    """Regression: the forward stopped at the first block where no token went on, so later
    blocks never got the keys of the tokens that left. On the earlier engine this model
    decoded differently from position 34 on, its blocks holding [40, 40, 34] keys."""
    torch.manual_seed(0)
    model = build("decoder", vocab_size=64, d_model=16, heads=2, context=64, layers=3,
                  threshold=0.15)
    torch.nn.init.normal_(model.embed.weight, std=0.2)
    prompt = torch.randint(0, 64, (1, 3))
    cached = adaptnet.generate(model, prompt, 60)
    assert torch.equal(cached, adaptnet.generate(model, prompt, 60, use_cache=False))
    with torch.no_grad():
        cache = model.eval().new_cache(1)
        depth = [model(cached[:, i:i + 1], cache=cache).depth for i in range(40)]
    assert [int(c.held()) for c in cache.layers[0]] == [40, 40, 40]
    assert int(torch.cat(depth, 1).min()) == 1, "no step where the token left at block 1"


def test_a_call_that_skips_a_layer_leaves_its_slot_empty(device):
    """A dense prefill, then steps that skip the block: their slots hold no key, and the
    cache reads the slots' validity from then on (batch 1: no other row writes there)."""
    torch.manual_seed(0)
    block = CausalBlock(16, 2).to(device).eval()
    t = 8
    x = torch.randn(1, t, 16, device=device)
    pos = torch.arange(t, device=device)[None]
    keep = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool, device=device)
    cache = block.new_cache(1, t)
    with torch.no_grad():
        got = [block(x[:, :3], Span(pos[:, :3], 0, 3), cache)]
        assert cache.dense
        for i in range(3, t):
            if keep[0, i]:
                got.append(block(x[:, i:i + 1], Span(pos[:, i:i + 1], i, i + 1), cache))
        kept = x[:, keep[0]]  # the same tokens alone, at their own positions
        want = block(kept, Span.of(kept, pos[:, keep[0]]))
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)
    assert not cache.dense and cache.held().tolist() == [5]


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(list(KINDS)), blocks=st.integers(3, 6), batch=st.integers(1, 3),
       lengths=st.lists(st.integers(1, 5), min_size=3, max_size=3), new=st.integers(1, 10),
       seed=st.integers(0, 2**16), padded=st.booleans())
def test_cached_decoding_equals_recompute_in_any_configuration(kind, blocks, batch, lengths,
                                                                new, seed, padded):
    """Any construct, 3-6 blocks of depth, batch 1-3, prompts padded or not."""
    kw = dict(KINDS[kind])
    kw["layers"] = blocks if "recursions" not in kw else max(1, blocks // kw["recursions"])
    torch.manual_seed(seed)
    model = spread_routes(decoder(vocab_size=V, d_model=16, heads=2, context=20, **kw),
                          embed_std=0.5).eval()
    ids, mask = left_padded(lengths[:batch], torch.device("cpu"))
    mask = mask if padded else None
    cached = adaptnet.generate(model, ids, new, prompt_mask=mask)
    assert torch.equal(cached, adaptnet.generate(model, ids, new, prompt_mask=mask,
                                                 use_cache=False))
