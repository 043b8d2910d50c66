"""MoE equals the per-token loop; capacity and balance loss follow their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaptnet import MoE
from adaptnet.errors import DynamicError

D = 6


def make(E: int, k: int, **kw) -> MoE:
    experts = [nn.Sequential(nn.Linear(D, 5), nn.Tanh()) for _ in range(E)]
    if E >= 3:
        experts[-1] = experts[0]  # one expert object under two indices: gradients accumulate
    return MoE(experts, nn.Linear(D, E), k=k, **kw)


def per_token_loop(moe: MoE, x: torch.Tensor, drop: torch.Tensor | None = None):
    """The oracle: route and run each token alone."""
    outs = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        top_logits, top = moe.router(xi).topk(moe.k, dim=-1)
        gates = torch.softmax(top_logits, dim=-1)
        out = 0
        for j in range(moe.k):
            if drop is None or not drop[i, j]:
                out = out + gates[0, j] * moe.experts[int(top[0, j])](xi)
        outs.append(out if isinstance(out, torch.Tensor) else torch.zeros(1, 5, dtype=x.dtype))
    return torch.cat(outs)


def grads(moe, x, out, w):
    moe.zero_grad(set_to_none=True)
    x.grad = None
    (out * w).sum().backward()
    g = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
         for n, p in moe.named_parameters()}
    g["input"] = x.grad.clone()
    return g


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 12), E=st.integers(1, 5), data=st.data(), seed=st.integers(0, 2**16))
def test_equals_per_token_loop(n, E, data, seed):
    k = data.draw(st.integers(1, E))
    torch.manual_seed(seed)
    moe = make(E, k).double()
    x = torch.randn(n, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, 5, dtype=torch.float64)
    r = moe(x)
    want = per_token_loop(moe, x)
    torch.testing.assert_close(r.output, want, rtol=1e-12, atol=1e-12)
    g_got, g_want = grads(moe, x, r.output, w), grads(moe, x, want, w)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m, nm=name: f"gradient of {nm}: {m}")
    assert not r.dropped.any()
    assert r.load.sum() == n * k


def test_leading_dimensions_are_kept_and_unpicked_experts_never_run():
    calls = []

    class Spy(nn.Linear):
        def forward(self, v):
            calls.append(id(self))
            return super().forward(v)

    experts = [Spy(D, D) for _ in range(4)]
    router = nn.Linear(D, 4)
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(torch.tensor([5.0, 4.0, -5.0, -5.0]))  # everyone picks 0 and 1
    r = MoE(experts, router, k=2)(torch.randn(3, 4, D))
    assert r.output.shape == (3, 4, D) and r.experts.shape == (3, 4, 2)
    assert sorted(set(calls)) == sorted({id(experts[0]), id(experts[1])})
    assert len(calls) == 2  # one batched call per picked expert
    assert r.load.tolist() == [12, 12, 0, 0]


def reference_keep(experts: torch.Tensor, gates: torch.Tensor, E: int, capacity: int):
    """Capacity policy in plain Python: per expert keep the highest gates (earlier tokens
    first on ties)."""
    keep = torch.ones_like(experts, dtype=torch.bool)
    for e in range(E):
        slots = [(-float(gates[i, j]), i, j) for i in range(experts.shape[0])
                 for j in range(experts.shape[1]) if experts[i, j] == e]
        for _, i, j in sorted(slots)[capacity:]:
            keep[i, j] = False
    return keep


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 4.0])
def test_capacity_drops_the_lowest_gates_per_expert(factor):
    torch.manual_seed(1)
    moe = make(4, 2, capacity_factor=factor).double()
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    x = torch.randn(20, D, dtype=torch.float64)
    r = moe(x)
    capacity = math.ceil(factor * 20 * 2 / 4)
    keep = reference_keep(r.experts, r.gates.detach(), 4, capacity)
    assert torch.equal(~r.dropped, keep)
    for e in range(4):
        assert int(((r.experts == e) & ~r.dropped).sum()) <= capacity
    torch.testing.assert_close(r.output, per_token_loop(moe, x, drop=r.dropped))
    assert r.dropped.any() == (factor < 4.0)


def test_balance_loss_follows_its_formula_and_trains_the_router():
    torch.manual_seed(2)
    moe = make(4, 2, balance_weight=0.5)
    x = torch.randn(16, D)
    r = moe(x)
    probs = torch.softmax(moe.router(x), -1)
    f = torch.stack([(r.experts == e).sum() for e in range(4)]).float() / (16 * 2)
    torch.testing.assert_close(r.aux_loss, 0.5 * 4 * (f * probs.mean(0)).sum())
    r.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_empty_input_and_no_grad():
    moe = make(3, 2)
    r = moe(torch.zeros(0, D))
    assert r.output.shape == (0, 5) and r.load.tolist() == [0, 0, 0] and r.aux_loss == 0
    with torch.no_grad():
        assert not moe(torch.randn(4, D)).output.requires_grad


@pytest.mark.slow
def test_eager_parity_under_torch_compile():
    moe = make(4, 2)
    x = torch.randn(10, D)
    compiled = torch.compile(moe, backend="aot_eager")  # per-expert counts break the graph
    torch.testing.assert_close(compiled(x).output, moe(x).output)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MoE([], nn.Linear(D, 1)), "experts is empty"),
        (lambda: MoE([nn.Linear(D, D)] * 3, nn.Linear(D, 3), k=4),
         r"k must be an integer from 1 to the number of experts \(3\), got 4"),
        (lambda: MoE([nn.Linear(D, D)] * 3, nn.Linear(D, 3), k=0), "got 0"),
        (lambda: MoE([nn.Linear(D, D)] * 3, nn.Linear(D, 3), capacity_factor=0),
         r"capacity_factor must be > 0 \(or None for no limit\), got 0"),
        (lambda: MoE([nn.Linear(D, D)] * 3, nn.Linear(D, 3), balance_weight=-1),
         "balance_weight must be finite and >= 0"),
        (lambda: MoE([nn.Linear(D, D)] * 3, nn.Linear(D, 4))(torch.randn(5, D)),
         r"router must return \(n, 3\) logits for n = 5 tokens and 3 experts, got \[5, 4\]"),
        (lambda: MoE([nn.Linear(D, 2), nn.Linear(D, 3)], nn.Linear(D, 2), k=2)(
            torch.randn(5, D)), "experts return different output shapes"),
    ],
)
def test_bad_arguments_are_dynamic_errors(build, match):
    with pytest.raises(DynamicError, match=match):
        build()
