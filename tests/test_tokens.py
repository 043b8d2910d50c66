"""Per-token adaptive depth: CausalBlock, Mixture-of-Depths and KV-cache decoding.

The oracle is a per-token Python loop: each token's query attends to exactly
the keys the rule allows, computed from the block's weights one token at a time.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import adaptnet
from adaptnet.dynamic import (
    CausalBlock,
    MixtureOfDepths,
    MixtureOfRecursions,
    Span,
    TokenEarlyExit,
    rope,
)
from adaptnet.errors import ConfigError, DynamicError, ModelError
from adaptnet.models import decoder
from conftest import spread_routes, stepwise

D, H = 8, 2


def token_loop(block: CausalBlock, x: torch.Tensor, positions: torch.Tensor,
               keep: torch.Tensor, keys_from: tuple | None = None) -> torch.Tensor:
    """``block`` on the tokens ``keep`` ``(B, T)`` of each row, one query at a time.

    Token ``i`` of row ``b`` attends to the kept tokens of row ``b`` whose
    position is at most its own, or with ``keys_from`` ``(states (B, T, d), block)``
    to the keys ``block`` makes of those states, of every token of the row.
    Rows of ``x`` not kept
    are returned as they are.
    """
    out = x.clone()
    dh = D // H
    for b in range(x.shape[0]):
        idx = keep[b].nonzero().squeeze(1).tolist()
        if not idx:
            continue
        xs = x[b, idx]  # (n, d)
        pos = positions[b, idx]
        q = block.qkv(block.norm1(xs)).view(len(idx), 3, H, dh)[:, 0]
        src = list(range(x.shape[1])) if keys_from is not None else idx
        states, by = keys_from if keys_from is not None else (x, block)
        _, k, v = by.qkv(by.norm1(states[b, src])).view(len(src), 3, H, dh).unbind(1)
        kpos = positions[b, src]
        q = rope(q.transpose(0, 1)[None], pos[None])[0]  # (H, n, dh)
        k = rope(k.transpose(0, 1)[None], kpos[None])[0]
        v = v.transpose(0, 1)
        for j, i in enumerate(idx):
            allowed = [m for m in range(len(src)) if kpos[m] <= pos[j]]
            w = torch.softmax(q[:, j:j + 1] @ k[:, allowed].transpose(1, 2) / math.sqrt(dh),
                              dim=-1)
            att = (w @ v[:, allowed]).transpose(0, 1).reshape(1, D)
            h = xs[j:j + 1] + block.proj(att)
            out[b, i] = (h + block.mlp(block.norm2(h)))[0]
    return out


def mod_loop(mod: MixtureOfDepths, x: torch.Tensor, positions: torch.Tensor,
             keep: torch.Tensor) -> torch.Tensor:
    """Mixture-of-Depths by the loop: kept tokens move by router weight × the block's update."""
    done = token_loop(mod.block, x, positions, keep)
    weight = torch.sigmoid(mod.router(x))
    return torch.where(keep[..., None], x + weight * (done - x), x)


def top_k(mod: MixtureOfDepths, x: torch.Tensor) -> torch.Tensor:
    scores = mod.router(x).squeeze(-1)
    k = math.ceil(mod.capacity * x.shape[1])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for b in range(x.shape[0]):
        keep[b, scores[b].topk(k).indices] = True
    return keep


def grads(out: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    w = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    return list(torch.autograd.grad((out * w).sum(), tensors, retain_graph=True))


def close_grads(got: torch.Tensor, want: torch.Tensor) -> None:
    """Gradients equal up to float32 accumulation, which grows with their magnitude (a
    gradient summed over many tokens of size 50 carries errors of 1e-5; in float64 the
    same comparisons agree to 1e-13)."""
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def params_and_input(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x, *module.parameters()]


sizes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(sizes, st.sampled_from([1.0, 0.5, 0.25, 0.01]))
@example((3, 9, 0), 0.5)
def test_mixture_of_depths_top_k_equals_the_token_loop(device, size, capacity):
    b, t, seed = size
    torch.manual_seed(seed)
    mod = MixtureOfDepths(CausalBlock(D, H), capacity, D).to(device).train()
    x = torch.randn(b, t, D, device=device, requires_grad=True)
    positions = torch.arange(t, device=device).expand(b, t)
    res = mod(x)
    out = res.output
    keep = top_k(mod, x)
    assert torch.equal(res.selected, keep)
    assert int(keep.sum(1).min()) == math.ceil(capacity * t)  # capacity 0.01: one token
    want = mod_loop(mod, x, positions, keep)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(out, *params_and_input(mod.block, x)),
                    grads(want, *params_and_input(mod.block, x)), strict=True):
        close_grads(g, w)
    g_router = grads(out, *mod.router.parameters())
    w_router = grads(want, *mod.router.parameters())
    for g, w in zip(g_router, w_router, strict=True):  # the router is on the gradient path
        close_grads(g, w)
        assert g.abs().sum() > 0


def test_capacity_one_is_the_dense_block_scaled_by_the_router():
    torch.manual_seed(0)
    mod = MixtureOfDepths(CausalBlock(D, H), 1.0, D).train()
    x = torch.randn(3, 7, D)
    dense = mod.block(x)  # plain causal attention over every token
    weight = torch.sigmoid(mod.router(x))
    torch.testing.assert_close(mod(x).output, x + weight * (dense - x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_a_straight_through_weight_gives_the_block_output_and_trains_the_router(training):
    """weight="straight": processed tokens get exactly the block's output; the router's
    gradient is the one the sigmoid weight would give (the loop's, with the weight's
    value replaced by 1)."""
    torch.manual_seed(1)
    mod = MixtureOfDepths(CausalBlock(D, H), 0.5, D, weight="straight").train(training)
    x = torch.randn(2, 8, D, requires_grad=True)
    if not training:  # the predictor picks the tokens whose first channel is 1
        with torch.no_grad():
            mod.predictor[0].weight.zero_()
            mod.predictor[0].weight[:, 0] = 2.0
            mod.predictor[0].bias.zero_()
            mod.predictor[2].weight.fill_(1.0)  # sum of silu(2 x0) - 0.5 per hidden unit
            mod.predictor[2].bias.fill_(-0.5 * mod.predictor[0].weight.shape[0])
            x[:, ::2, 0], x[:, 1::2, 0] = 1.0, -1.0
    res = mod(x)
    keep = res.selected
    assert 0 < int(keep.sum()) < keep.numel()  # some tokens skipped, some ran
    done = token_loop(mod.block, x, torch.arange(8).expand(2, 8), keep)
    torch.testing.assert_close(res.output[keep], done[keep], rtol=1e-5, atol=1e-6)
    assert torch.equal(res.output[~keep], x[~keep])
    w = torch.sigmoid(mod.router(x))
    want = torch.where(keep[..., None], x + (w - w.detach() + 1) * (done - x), x)
    for g, ref in zip(grads(res.output, *mod.router.parameters()),
                      grads(want, *mod.router.parameters()), strict=True):
        close_grads(g, ref)
        assert g.abs().sum() > 0


def test_capacity_one_runs_every_token_in_evaluation_whatever_the_predictor_says():
    torch.manual_seed(0)
    mod = MixtureOfDepths(CausalBlock(D, H), 1.0, D, weight="straight").eval()
    torch.nn.init.zeros_(mod.predictor[2].weight)
    torch.nn.init.constant_(mod.predictor[2].bias, -5.0)  # would skip every token
    x = torch.randn(3, 7, D)
    res = mod(x)
    assert bool(res.selected.all())
    torch.testing.assert_close(res.output, mod.block(x), rtol=1e-5, atol=1e-6)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False
    res = mod(x, Span.of(x, mask=mask))
    assert torch.equal(res.selected, mask)


def test_an_unknown_weight_is_refused():
    with pytest.raises(DynamicError, match="weight must be 'router'"):
        MixtureOfDepths(CausalBlock(D, H), 0.5, D, weight="unit")


@settings(max_examples=25, deadline=None)
@given(sizes, st.sampled_from(["predictor", "none", "all"]))
@example((3, 9, 3), "predictor")  # rows keep 4, 1 and 0 tokens: padding in a ragged batch
def test_the_causal_rule_equals_the_token_loop(device, size, rule):
    """Evaluation: each token is processed iff its predictor logit is > 0; ragged rows."""
    b, t, seed = size
    torch.manual_seed(seed)
    mod = MixtureOfDepths(CausalBlock(D, H), 0.5, D).to(device).eval()
    if rule != "predictor":  # every token skips, or every token is processed
        torch.nn.init.zeros_(mod.predictor[2].weight)
        torch.nn.init.constant_(mod.predictor[2].bias, -1.0 if rule == "none" else 1.0)
    x = torch.randn(b, t, D, device=device, requires_grad=True)
    positions = torch.arange(t, device=device).expand(b, t)
    res = mod(x)
    out = res.output
    keep = mod.predictor(x).squeeze(-1) > 0
    assert torch.equal(res.selected, keep)
    want = mod_loop(mod, x, positions, keep)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if rule == "none":
        assert torch.equal(out, x)
    g, w = grads(out, x), grads(want, x)
    torch.testing.assert_close(g[0], w[0], rtol=1e-4, atol=1e-5)


def test_the_block_on_gathered_tokens_rotates_by_their_positions():
    """Positions travel with the tokens: tokens 1 and 4 alone, at positions 1 and 4."""
    torch.manual_seed(0)
    block = CausalBlock(D, H)
    x = torch.randn(1, 6, D)
    pos = torch.arange(6)[None]
    keep = torch.zeros(1, 6, dtype=torch.bool)
    keep[0, [1, 4]] = True
    alone = block(x[:, [1, 4]], Span.of(x[:, [1, 4]], pos[:, [1, 4]]))
    torch.testing.assert_close(alone, token_loop(block, x, pos, keep)[:, [1, 4]],
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone, block(x[:, [1, 4]]))  # positions 0, 1 differ


def test_the_cache_holds_ragged_rows_and_attends_only_to_their_keys(device):
    """One token at a time, rows skipping at random: the same as no cache."""
    torch.manual_seed(0)
    block = CausalBlock(D, H).to(device).eval()
    b, t = 3, 6
    x = torch.randn(b, t, D, device=device)
    pos = torch.arange(t, device=device).expand(b, t)
    keep = torch.rand(b, t, device=device) < 0.6
    keep[:, 0] = True
    want = token_loop(block, x, pos, keep)
    cache = block.new_cache(b, t)
    with torch.no_grad():
        for i in range(t):
            rows = keep[:, i].nonzero().squeeze(1)
            if len(rows):
                got = block(x[rows, i:i + 1], Span(pos[rows, i:i + 1], i, i + 1, rows=rows),
                            cache)
                torch.testing.assert_close(got[:, 0], want[rows, i], rtol=1e-5, atol=1e-6)
    assert cache.held().tolist() == keep.sum(1).tolist()
    assert not cache.dense


def mor_loop(mor: MixtureOfRecursions, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture-of-Recursions by the loop: per step, the rule's tokens go through the step's
    layers one at a time, each attending among that step's tokens (``kv="share"``: to the
    keys that layer made at step 0, of every token); returns output and depth."""
    b, t, _ = x.shape
    positions = torch.arange(t, device=x.device).expand(b, t)
    depth = torch.zeros(b, t, dtype=torch.long, device=x.device)
    active = torch.ones(b, t, dtype=torch.bool, device=x.device)
    first = []  # the input states of step 0's layers
    if mor.router_kind == "token":
        probs = torch.softmax(mor.depth_router(x), -1)
        weight, chosen = probs.max(-1)
    for r in range(mor.recursions):
        if mor.router_kind == "token":
            keep = chosen >= r
        else:
            weight = torch.sigmoid(mor.routers[r](x).squeeze(-1))
            if mor.training:
                k = math.ceil(t * (mor.recursions - r) / mor.recursions)
                keep = torch.zeros_like(active)
                for row in range(b):
                    going = active[row].nonzero().squeeze(1)
                    keep[row, going[weight[row, going].topk(k).indices]] = True
            else:
                keep = active & (mor.predictors[r - 1](x).squeeze(-1) > 0) if r else active
            active = keep
        done = x
        for j, which in enumerate(mor.schedule[r]):
            if r == 0:
                first.append((done, mor.blocks[which]))
            shared = first[j] if mor.kv == "share" and r else None
            done = token_loop(mor.blocks[which], done, positions, keep, shared)
        x = torch.where(keep[..., None], x + weight[..., None] * (done - x), x)
        depth += keep
    return x, depth


@settings(max_examples=20, deadline=None)
@given(sizes, st.sampled_from(["expert", "token"]), st.booleans(), st.integers(1, 3),
       st.sampled_from(["cycle", "sequence"]), st.sampled_from(["cache", "share"]))
@example((3, 9, 0), "expert", True, 3, "cycle", "cache")
@example((3, 9, 1), "token", False, 3, "cycle", "share")
@example((2, 7, 2), "expert", False, 2, "sequence", "share")
@example((1, 1, 3), "expert", True, 2, "sequence", "share")
def test_mixture_of_recursions_equals_the_token_loop(device, size, router, training, recursions,
                                                     share, kv):
    b, t, seed = size
    torch.manual_seed(seed)
    mor = MixtureOfRecursions([CausalBlock(D, H), CausalBlock(D, H)], recursions, D,
                              router, share=share, kv=kv).to(device).train(training)
    if router == "token":  # spread the chosen depths
        torch.nn.init.normal_(mor.depth_router.weight, std=2.0)
    x = torch.randn(b, t, D, device=device, requires_grad=True)
    res = mor(x)
    out = res.output
    want, depth = mor_loop(mor, x)
    assert torch.equal(res.depth, depth * len(mor.blocks))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    tensors = [x, *mor.parameters()]
    w = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
    got_g = torch.autograd.grad((out * w).sum(), tensors, allow_unused=True, retain_graph=True)
    want_g = torch.autograd.grad((want * w).sum(), tensors, allow_unused=True)
    for g, w in zip(got_g, want_g, strict=True):
        assert (g is None) == (w is None) or float((g if w is None else w).abs().sum()) == 0
        if g is not None and w is not None:
            close_grads(g, w)
    if training and router == "expert":
        assert (res.aux_loss is not None) == (recursions > 1)
        assert depth.sum(1).tolist() == [sum(math.ceil(t * (recursions - r) / recursions)
                                             for r in range(recursions))] * b


@pytest.mark.parametrize(("blocks", "steps", "share"),
                         [(2, 2, "cycle"), (2, 2, "sequence"), (2, 3, "sequence"),
                          (2, 3, "cycle_rev"), (3, 2, "cycle_rev"), (1, 3, "all")])
def test_the_share_strategies_order_the_recursion_steps(blocks, steps, share):
    """Every one of adaptnet.share's strategies orders MoR's layers as share() would."""
    mor = MixtureOfRecursions([CausalBlock(D, H) for _ in range(blocks)], steps, D, share=share)
    n = blocks * steps
    owners = adaptnet.share(torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(n)]),
                            [str(i) for i in range(n)], blocks=blocks, strategy=share)
    firsts = sorted(set(owners), key=int)  # share's blocks are the first layer of each
    assert [i for step in mor.schedule for i in step] == [firsts.index(o) for o in owners]
    assert MixtureOfRecursions([CausalBlock(D, H)] * 2, 2, D).schedule == [[0, 1], [0, 1]]
    assert MixtureOfRecursions([CausalBlock(D, H)] * 2, 3, D, share="sequence").schedule == \
        [[0, 0], [0, 1], [1, 1]]


def test_a_strategy_the_stack_cannot_take_is_refused_as_share_refuses_it():
    with pytest.raises(DynamicError, match=r"share='all' over 2 blocks: strategy 'all' uses "
                       r"one block, got blocks=2; use strategy='cycle' or 'sequence'"):
        MixtureOfRecursions([CausalBlock(D, H), CausalBlock(D, H)], 2, D, share="all")


def test_recursions_share_one_stack_at_half_the_unique_parameters():
    vanilla = adaptnet.summary(decoder(layers=4))
    mor = adaptnet.summary(decoder(layers=2, recursions=2))
    blocks = adaptnet.summary(CausalBlock(128, 4)).unique
    embed = 65 * 128
    # the stack once, the (tied) embedding and final norm once, routers and one predictor
    assert mor.unique == embed + 2 * 128 + 2 * blocks + 2 * 129 + (128 * 32 + 32 + 33)
    assert vanilla.unique == embed + 2 * 128 + 4 * blocks
    assert mor.unique / vanilla.unique < 0.515  # over 1/2 by half the embedding and the rest
    with pytest.raises(DynamicError, match=r"router must be 'expert' or 'token', got 'tokens'"):
        MixtureOfRecursions([CausalBlock(D, H)], 2, D, "tokens")
    with pytest.raises(DynamicError, match=r"share must be 'all' or 'cycle' or 'sequence' or "
                       r"'cycle_rev', got 'loop'"):
        MixtureOfRecursions([CausalBlock(D, H)], 2, D, share="loop")
    with pytest.raises(DynamicError, match=r"kv must be 'cache' or 'share', got 'none'"):
        MixtureOfRecursions([CausalBlock(D, H)], 2, D, kv="none")
    with pytest.raises(DynamicError, match=r"max_recursions must be a whole number >= 1"):
        MixtureOfRecursions([CausalBlock(D, H)], 0, D)
    with pytest.raises(ModelError, match=r"share='sequence' and kv='cache' choose how "
                       r"recursions reuse the stack; give recursions too"):
        decoder(share="sequence")


@pytest.mark.parametrize(("router", "share", "kv"), [("expert", "cycle", "cache"),
                                                     ("token", "cycle", "cache"),
                                                     ("expert", "sequence", "share"),
                                                     ("token", "cycle", "share")])
def test_generate_with_recursion_caches_equals_full_recompute(router, share, kv):
    torch.manual_seed(1)
    model = decoder(vocab_size=11, d_model=D, layers=2, heads=H, context=24, recursions=3,
                    router=router, share=share, kv=kv)
    mor = model.blocks[0]
    torch.nn.init.normal_(model.embed.weight)  # varied tokens, so they route differently
    if router == "expert":
        for p in mor.predictors:
            torch.nn.init.normal_(p[2].weight, std=3.0)
            torch.nn.init.zeros_(p[2].bias)
    else:
        torch.nn.init.normal_(mor.depth_router.weight, std=3.0)
    prompt = torch.randint(0, 11, (3, 4))
    cached = adaptnet.generate(model, prompt, 10)
    assert torch.equal(cached, adaptnet.generate(model, prompt, 10, use_cache=False))
    cache, logits = stepwise(model, cached, 4)
    with torch.no_grad():
        full = model(cached)
    torch.testing.assert_close(logits, full.output, rtol=1e-5, atol=1e-5)
    depth = full.layers[0].depth // len(mor.blocks)
    assert len(set(depth.flatten().tolist())) > 1, "every token took the same depth"
    held = [int(c.held().sum()) for c in cache.layers[0]]
    if kv == "cache":
        assert held[::2] == [int((depth > r).sum()) for r in range(3)]  # keys per step
    else:  # the step-0 keys of every token, once per layer
        assert held == [3 * 14, 3 * 14]


def attend(block: CausalBlock, h: torch.Tensor, pos: int, states: torch.Tensor) -> torch.Tensor:
    """One token's pass through ``block``: its query against ``states`` at positions 0..n-1."""
    dh = D // H
    w, bias = block.qkv.weight, block.qkv.bias
    q = F.linear(block.norm1(h), w[:D], bias[:D]).view(1, H, 1, dh).transpose(1, 2)
    kv = block.norm1(states)
    k = F.linear(kv, w[D:2 * D], bias[D:2 * D]).view(1, -1, H, dh).transpose(1, 2)
    v = F.linear(kv, w[2 * D:], bias[2 * D:]).view(1, -1, H, dh).transpose(1, 2)
    n = states.shape[0]
    q = rope(q.transpose(1, 2), torch.tensor([[pos]], device=h.device))
    k = rope(k, torch.arange(n, device=h.device)[None])
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v  # (1, H, 1, dh)
    out = h + block.proj(att.transpose(1, 2).reshape(D))
    return out + block.mlp(block.norm2(out))


def exit_loop(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token early exit by the loop: tokens in order, each block by hand; a token that
    left stands in every later block by its last state (state propagation)."""
    exits = model.blocks[0]
    b, t = ids.shape
    logits = torch.zeros(b, t, model.head.out_features, device=ids.device)
    depth = torch.zeros(b, t, dtype=torch.long, device=ids.device)
    for row in range(b):
        states = [[None] * t for _ in exits.blocks]  # the input state of each block
        for i in range(t):
            h, left = model.embed(ids[row, i]), False
            for j, block in enumerate(exits.blocks):
                states[j][i] = h
                if left:
                    continue
                h = attend(block, h, i, torch.stack(states[j][:i + 1]))
                depth[row, i] += 1
                out = model.readout(h)
                last = j == len(exits.blocks) - 1
                if exits.rule == "learned":
                    sure = torch.sigmoid(exits.classifiers[j](h)).item() if not last else 1.0
                else:
                    sure = torch.softmax(out, -1).max()
                if last or sure >= exits.threshold:
                    logits[row, i], left = out, True
    return logits, depth


def learned_exits(model) -> None:
    """Classifiers that let some tokens leave at every block and keep others."""
    for c in model.blocks[0].classifiers:
        torch.nn.init.normal_(c.weight, std=2.0)
        torch.nn.init.zeros_(c.bias)


@settings(max_examples=15, deadline=None)
@given(sizes, st.sampled_from([0.6, 0.7, 0.8, 1e-9, 1.0]), st.sampled_from(["confidence",
                                                                             "learned"]))
@example((3, 9, 0), 0.7, "confidence")
@example((3, 9, 0), 0.6, "learned")
def test_per_token_early_exit_equals_the_token_loop(device, size, threshold, rule):
    """1e-9: every token leaves after block 1; 1.0: none leaves early (the dense model)."""
    b, t, seed = size
    torch.manual_seed(seed)
    model = decoder(vocab_size=11, d_model=D, layers=3, heads=H, context=16,
                    threshold=threshold, rule=rule).eval()
    torch.nn.init.normal_(model.embed.weight)  # confident enough to leave at every block
    if rule == "learned":
        learned_exits(model)
    model.to(device)
    ids = torch.randint(0, 11, (b, t), device=device)
    out = model(ids)
    want, depth = exit_loop(model, ids)
    assert torch.equal(out.depth, depth)
    if size == (3, 9, 0):
        assert set(depth.flatten().tolist()) == {1, 2, 3}
    torch.testing.assert_close(out.output, want, rtol=1e-5, atol=1e-5)
    # The extremes hold for the confidence rule (a top probability lies in [1/V, 1) here);
    # a learned classifier's sigmoid saturates to exactly 0 or 1 in float32, and the oracle
    # loop then leaves where the model does.
    if threshold == 1e-9 and rule == "confidence":
        assert bool((depth == 1).all())
    if threshold == 1.0 and rule == "confidence":
        assert bool((depth == 3).all())
        dense = model.train()(ids)
        torch.testing.assert_close(out.output, dense.output, rtol=1e-5, atol=1e-5)
    params = list(model.parameters())
    got = torch.autograd.grad((model.eval()(ids).output * 1.5).sum(), params, allow_unused=True)
    ref = torch.autograd.grad((want * 1.5).sum(), params, allow_unused=True)
    for g, w in zip(got, ref, strict=True):
        if g is None or w is None:
            assert (g is None or float(g.abs().sum()) == 0) and (w is None or
                                                                float(w.abs().sum()) == 0)
        else:
            close_grads(g, w)


@pytest.mark.parametrize("rule", ["confidence", "learned"])
def test_per_token_exits_decode_with_propagated_keys_as_full_recompute(rule):
    torch.manual_seed(0)
    model = decoder(vocab_size=11, d_model=D, layers=3, heads=H, context=24,
                    threshold=0.7 if rule == "confidence" else 0.5, rule=rule)
    torch.nn.init.normal_(model.embed.weight)  # confident enough to leave at every block
    if rule == "learned":
        learned_exits(model)
    prompt = torch.randint(0, 11, (4, 3))
    cached = adaptnet.generate(model, prompt, 12)
    assert torch.equal(cached, adaptnet.generate(model, prompt, 12, use_cache=False))
    _, logits = stepwise(model, cached, 3)
    with torch.no_grad():
        full = model(cached)
    torch.testing.assert_close(logits, full.output, rtol=1e-5, atol=1e-5)
    assert set(full.depth.flatten().tolist()) == {1, 2, 3}, "tokens should leave at every block"
    out = model.train()(cached)  # training: every exit, a joint loss over them
    assert len(out.exit_logits) == 3 and bool((out.depth == 3).all())
    loss = out.task_loss(cached)
    torch.testing.assert_close(loss, sum(F.cross_entropy(z.flatten(0, 1), cached.flatten())
                                         for z in out.exit_logits) / 3)
    if rule == "confidence":
        assert out.aux_loss is None
        return
    exits = model.blocks[0]  # the classifiers learn whether exit i agrees with the last one
    final = out.exit_logits[-1].argmax(-1)
    states, h = [], model.embed(cached)
    for block in exits.blocks:
        h = block(h)
        states.append(h)
    want = sum(F.binary_cross_entropy_with_logits(
        c(s).squeeze(-1), (z.argmax(-1) == final).float())
        for c, s, z in zip(exits.classifiers, states, out.exit_logits, strict=False))
    torch.testing.assert_close(out.aux_loss, want)
    assert torch.autograd.grad(out.aux_loss, model.embed.weight, allow_unused=True)[0] is None


def test_bad_exit_settings_name_the_argument():
    with pytest.raises(DynamicError, match=r"threshold is the confidence to leave at, in "
                       r"\(0, 1\], or math.inf for never; got 0"):
        decoder(threshold=0)
    with pytest.raises(DynamicError, match=r"math.inf for never; got 1.5"):
        decoder(threshold=1.5)
    with pytest.raises(DynamicError, match=r"rule must be 'confidence' \(top softmax "
                       r"probability\) or 'learned' \(a classifier per exit\), got 'meta'"):
        decoder(threshold=0.5, rule="meta")
    with pytest.raises(DynamicError, match=r"rule='learned' needs d_model"):
        TokenEarlyExit([CausalBlock(D, H)], lambda h: h, 0.5, "learned")
    with pytest.raises(ModelError, match=r"rule='learned' goes with threshold"):
        decoder(rule="learned")
    block = CausalBlock(D, H)
    x = torch.randn(1, 2, D)
    with pytest.raises(DynamicError, match=r"a read up to slot 2 of a cache filled to 0; "
                       r"write the keys of slots before reading them"):
        block(x, Span.of(x).reading(), block.new_cache(1, 4))


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_generate_with_the_cache_equals_full_recompute_at_batch_three(capacity):
    torch.manual_seed(0)
    model = decoder(vocab_size=11, d_model=D, layers=4, heads=H, context=24,
                    capacity=capacity)
    torch.nn.init.normal_(model.embed.weight)  # varied tokens, so rows route differently
    if capacity is not None:  # a predictor that selects some tokens and skips others
        for block in model.blocks[1::2]:
            torch.nn.init.normal_(block.predictor[2].weight, std=3.0)
            torch.nn.init.zeros_(block.predictor[2].bias)
    prompt = torch.randint(0, 11, (3, 5))
    cached = adaptnet.generate(model, prompt, 12)
    full = adaptnet.generate(model, prompt, 12, use_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :5], prompt) and cached.shape == (3, 17)
    with torch.no_grad():
        model.eval()
        cache = model.new_cache(3)
        step = model(cached[:, :10], cache=cache).output
        ref = model(cached[:, :11]).output
        nxt = model(cached[:, 10:11], cache=cache).output
    torch.testing.assert_close(step, ref[:, :10], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt[:, 0], ref[:, 10], rtol=1e-5, atol=1e-5)
    if capacity is not None:
        keys = [c.held().tolist() for c in cache.layers[1::2]]
        assert any(len(set(row)) > 1 for row in keys), "no two rows kept different tokens"
        assert all(0 < sum(row) < 3 * 11 for row in keys)  # some tokens skipped, some not


def test_a_decoder_trains_with_fit_and_reports_depth_per_token():
    torch.manual_seed(0)
    model = decoder(vocab_size=11, d_model=D, layers=2, heads=H, context=16,
                    capacity=0.25, every=2)
    ids = torch.randint(0, 11, (32, 9))
    result = adaptnet.fit(model, (ids[:, :-1], ids[:, 1:]), loss="cross_entropy",
                          epochs=2, batch_size=8, metrics=("loss", "steps"))
    row = result.history[-1]
    assert row["train/steps"] == pytest.approx(1 + 2 / 8)  # 2 of 8 tokens reach block 2
    out = model.train()(ids[:, :-1])
    assert out.aux_loss is not None and out.depth.shape == (32, 8)
    adaptnet.assert_tied(model)


@pytest.mark.parametrize("capacity", [0, -0.5, 1.5, True, float("nan"), "half", None])
def test_capacity_outside_zero_one_is_refused(capacity):
    """The one capacity check the sample-level constructs use, with its error type."""
    with pytest.raises(DynamicError, match=r"MixtureOfDepths: capacity (must be a fraction in "
                       r"\(0, 1\]|is the fraction of each sequence's tokens).*; got"):
        MixtureOfDepths(CausalBlock(D, H), capacity, D)


def test_bad_decoding_requests_name_the_argument_and_the_fix():
    model = decoder(vocab_size=11, d_model=D, layers=2, heads=H, context=8)
    with pytest.raises(ConfigError, match=r"a prompt of 6 tokens plus max_new_tokens=3 makes 9, "
                       r"longer than the model's context of 8"):
        adaptnet.generate(model, torch.zeros(2, 6, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match=r"a sequence of 9 tokens is longer than the model's "
                       r"context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"prompt_ids must be \(batch, tokens\) integer ids"):
        adaptnet.generate(model, torch.zeros(6), 3)
    with pytest.raises(ConfigError, match=r"has no new_cache\(batch\), so it cannot decode "
                       r"with a KV cache"):
        adaptnet.generate(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 1)
    mod = MixtureOfDepths(CausalBlock(D, H), 0.5, D).train()
    with pytest.raises(DynamicError, match=r"a KV cache is for decoding; call model.eval\(\)"):
        mod(torch.randn(1, 3, D), cache=mod.new_cache(1, 3))
    with pytest.raises(ConfigError, match=r"d_model=6 must split into 2 heads of an even width"):
        CausalBlock(6, 2)


def test_rope_is_a_rotation_and_relative():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    p = torch.tensor([[3]])
    torch.testing.assert_close(rope(q, p).norm(), q.norm())
    a = (rope(q, p + 5) * rope(k, p)).sum()
    b = (rope(q, p + 9) * rope(k, p + 4)).sum()  # same offset: same score
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert F.cosine_similarity(rope(q, p).flatten(), q.flatten(), dim=0) < 0.999


KINDS = {
    "vanilla": {},
    "mod": {"capacity": 0.5},
    "mor-expert": {"layers": 2, "recursions": 3},
    "mor-token-kv-share": {"layers": 2, "recursions": 2, "router": "token", "kv": "share"},
    "mor-sequence-kv-share": {"layers": 2, "recursions": 2, "share": "sequence", "kv": "share"},
    "exit": {"layers": 3, "threshold": 0.6},
    "exit-learned": {"layers": 3, "threshold": 0.5, "rule": "learned"},
}


def padded(rows: list[torch.Tensor], t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded to ``t`` with junk ids: even rows on the left, odd rows on the right."""
    ids = torch.randint(0, 11, (len(rows), t))
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, row in enumerate(rows):
        at = slice(t - len(row), t) if i % 2 == 0 else slice(0, len(row))
        ids[i, at], mask[i, at] = row, True
    return ids, mask


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_padding_is_invisible_outputs_and_gradients_equal_each_row_alone(kind, training):
    torch.manual_seed(0)
    model = decoder(vocab_size=11, d_model=D, heads=H, context=16, **({"layers": 4}
                                                                      | KINDS[kind]))
    spread_routes(model)
    model.train(training)
    rows = [torch.randint(0, 11, (n,)) for n in (5, 1, 0, 8, 3, 6)]  # 0: all padding
    ids, mask = padded(rows, 8)
    out = model(ids, mask=mask)
    weights = torch.randn(*ids.shape, 11)
    params = list(model.parameters())
    got = torch.autograd.grad((out.output * weights)[mask].sum(), params, allow_unused=True)
    total = 0
    for i, row in enumerate(rows):
        if not len(row):
            continue
        alone = model(row[None])
        torch.testing.assert_close(out.output[i, mask[i]], alone.output[0], rtol=1e-5,
                                   atol=1e-5)
        assert torch.equal(out.depth[i, mask[i]], alone.depth[0])
        total = total + (alone.output[0] * weights[i, mask[i]]).sum()
    assert bool((out.depth[~mask] == 0).all())
    if not training and kind != "vanilla":
        assert len(set(out.depth[mask].tolist())) > 1, "every token took the same depth"
    want = torch.autograd.grad(total, params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if g is None or w is None:
            assert all(v is None or float(v.abs().sum()) == 0 for v in (g, w))
        else:
            close_grads(g, w)


@pytest.mark.parametrize("kind", ["vanilla", "mod", "mor-sequence-kv-share", "exit"])
def test_generate_from_left_padded_prompts_equals_each_prompt_alone(kind):
    torch.manual_seed(0)
    model = decoder(vocab_size=11, d_model=D, heads=H, context=24, **({"layers": 4}
                                                                      | KINDS[kind]))
    spread_routes(model)
    prompts = [torch.randint(0, 11, (n,)) for n in (4, 1, 6)]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, 6 - len(p):], mask[i, 6 - len(p):] = p, True
    cached = adaptnet.generate(model, ids, 8, prompt_mask=mask)
    assert torch.equal(cached, adaptnet.generate(model, ids, 8, prompt_mask=mask,
                                                 use_cache=False))
    for i, p in enumerate(prompts):
        alone = adaptnet.generate(model, p[None], 8)
        assert torch.equal(cached[i, 6 - len(p):], alone[0])


def test_bad_masks_name_the_argument_and_the_fix():
    model = decoder(vocab_size=11, d_model=D, layers=2, heads=H, context=8)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"mask must be a bool tensor shaped like ids "
                       r"\(2, 3\) \(True at real tokens\), got torch.bool \(2, 4\)"):
        model(ids, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"mask must be a bool tensor .* got torch.int64"):
        model(ids, mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"prompt_mask must be a bool tensor shaped like "
                       r"prompt_ids \(2, 3\)"):
        adaptnet.generate(model, ids, 1, prompt_mask=torch.ones(3, 2, dtype=torch.bool))
    right = torch.tensor([[True, True, False], [True, True, True]])
    with pytest.raises(ConfigError, match=r"prompt_mask must pad on the left"):
        adaptnet.generate(model, ids, 1, prompt_mask=right)


def test_the_learned_rule_reads_every_token_out_once_from_its_exit_state():
    """With rule="learned" the head (a vocabulary's worth of work per token, all of its
    weights read in a decoding step) runs once per call, on every token's state at the
    exit it took; the classifiers decide the exits."""
    torch.manual_seed(0)
    seen = []
    readout = torch.randn(D, 5)

    def head(h):
        seen.append(h.shape[0] * h.shape[1])
        return h @ readout

    blocks = [CausalBlock(D, H) for _ in range(3)]
    exits = TokenEarlyExit(blocks, head, 0.5, "learned", D).eval()
    with torch.no_grad():
        for c in exits.classifiers:
            torch.nn.init.normal_(c.weight, std=2.0)
            torch.nn.init.zeros_(c.bias)
    out = exits(torch.randn(1, 12, D))
    depth = out.depth[0].tolist()
    assert len(set(depth)) > 1  # tokens left at different exits
    assert seen == [12]  # one readout, every token
    # (that they are the exit states' logits: test_per_token_early_exit_equals_the_token_loop)
