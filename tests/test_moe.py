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


# ------------------------------------------------------------- StackedExperts: the fast path


DS, HS = 8, 4  # rows of 32 and 16 bytes: what grouped_mm takes


def stacked(E: int, k: int, gated: bool, d: int = DS, **kw) -> MoE:
    from adaptnet.dynamic import StackedExperts

    experts = StackedExperts(E, d, HS, activation="silu" if gated else "gelu", gated=gated,
                             bias=not gated)
    return MoE(experts, nn.Linear(d, E), k=k, **kw)


def stacked_loop(moe: MoE, x: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle for stacked experts: each token alone, each expert written out by hand."""
    st_ = moe.experts
    act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[st_.activation]
    outs = []
    for i in range(x.shape[0]):
        xi = x[i]
        top_logits, top = moe.router(xi).topk(moe.k)
        gates = torch.softmax(top_logits, dim=-1)
        out = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(moe.k):
            if drop is not None and drop[i, j]:
                continue
            e = int(top[j])
            h = st_.w1[e] @ xi + (0 if st_.b1 is None else st_.b1[e])
            if st_.gated:
                g, u = h[:HS], h[HS:]
                h = act(g) * u
            else:
                h = act(h)
            out = out + gates[j] * (st_.w2[e] @ h + (0 if st_.b2 is None else st_.b2[e]))
        outs.append(out)
    return torch.stack(outs) if outs else torch.zeros(0, x.shape[1], dtype=x.dtype)


@pytest.mark.parametrize("path", ["grouped", "loop"])
@pytest.mark.parametrize("gated", [False, True])
@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 24), E=st.integers(1, 5), data=st.data(), seed=st.integers(0, 2**16))
def test_stacked_experts_equal_the_per_token_loop(path, gated, n, E, data, seed):
    k = data.draw(st.integers(1, E))
    factor = data.draw(st.sampled_from([None, 0.5, 1.0]))
    torch.manual_seed(seed)
    moe = stacked(E, k, gated, capacity_factor=factor)
    moe.experts.LOOP_ROWS = 0 if path == "loop" else 10**9  # instance attribute: this test's
    x = torch.randn(n, DS, requires_grad=True)  # float32: grouped_mm's dtype
    w = torch.randn(n, DS)
    calls = []
    real = torch.nn.functional.grouped_mm

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    torch.nn.functional.grouped_mm = spy
    try:
        r = moe(x)
    finally:
        torch.nn.functional.grouped_mm = real
    assert bool(calls) == (path == "grouped" and n > 0)  # the path asked for was taken
    want = stacked_loop(moe, x, r.dropped)
    torch.testing.assert_close(r.output, want, rtol=1e-5, atol=1e-5)
    if n == 0:  # no tokens: nothing ran, nothing to differentiate
        assert r.output.shape == (0, DS) and r.load.sum() == 0
        return
    g_got, g_want = grads(moe, x, r.output, w), grads(moe, x, want, w)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, nm=name: f"gradient of {nm}: {m}")
    if factor is None:
        assert not r.dropped.any() and r.load.sum() == n * k


def test_stacked_experts_equal_the_general_path_on_the_same_weights_in_float64():
    torch.manual_seed(0)
    moe = stacked(4, 2, True).double()
    general = MoE([moe.experts[e] for e in range(4)], moe.router, k=2)
    x = torch.randn(40, DS, dtype=torch.float64)
    torch.testing.assert_close(moe(x).output, general(x).output, rtol=1e-12, atol=1e-12)
    to_one = stacked(4, 1, False)
    with torch.no_grad():  # every token to expert 2: one group holds every row
        to_one.router.weight.zero_()
        to_one.router.bias.copy_(torch.tensor([-5.0, -5.0, 5.0, -5.0]))
    x = torch.randn(9, DS)
    r = to_one(x)
    assert r.load.tolist() == [0, 0, 9, 0]
    torch.testing.assert_close(r.output, stacked_loop(to_one, x), rtol=1e-5, atol=1e-5)


def test_stacked_experts_with_fixed_slots_equal_the_same_capacity_factor():
    torch.manual_seed(1)
    fixed = stacked(4, 2, True, capacity_factor=1.0, fixed_slots=True)
    free = MoE(fixed.experts, fixed.router, k=2, capacity_factor=1.0)
    x = torch.randn(30, DS)
    a, b = fixed(x), free(x)
    torch.testing.assert_close(a.output, b.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.dropped, b.dropped) and a.dropped.any()


def test_stacked_experts_charge_each_token_its_own_work():
    import adaptnet

    torch.manual_seed(2)
    moe = stacked(4, 2, False)
    general = MoE([moe.experts[e] for e in range(4)], moe.router, k=2)
    x = torch.randn(12, DS)
    with adaptnet.count_macs(batch_size=12) as fast:
        moe(x)
    with adaptnet.count_macs(batch_size=12) as slow:
        general(x)
    assert fast.total == slow.total > 0  # grouped_mm counted as its groups' matmuls
    torch.testing.assert_close(fast.per_sample, slow.per_sample)


def test_stacked_experts_refuse_bad_arguments():
    from adaptnet.dynamic import StackedExperts

    for kw, match in (({"num": 0}, "num must be a positive int"),
                      ({"activation": "tanh"}, "activation must be one of"),
                      ({"gated": True}, "gated .* experts have no biases")):
        args = {"num": 4, "d_in": DS, "hidden": HS, **kw}
        with pytest.raises(DynamicError, match=match):
            StackedExperts(**args)


def test_widths_grouped_mm_cannot_take_run_the_loop_and_agree():
    torch.manual_seed(3)
    moe = stacked(3, 2, True, d=6)  # rows of 24 bytes: not what grouped_mm takes
    calls = []
    real = torch.nn.functional.grouped_mm
    torch.nn.functional.grouped_mm = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        x = torch.randn(10, 6)
        torch.testing.assert_close(moe(x).output, stacked_loop(moe, x), rtol=1e-5, atol=1e-5)
    finally:
        torch.nn.functional.grouped_mm = real
    assert not calls


@pytest.mark.slow
def test_stacked_experts_with_fixed_slots_compile_whole_and_export():
    import torch._dynamo as dynamo

    torch.manual_seed(4)
    moe = stacked(4, 2, True, capacity_factor=1.0, fixed_slots=True).eval()
    x = torch.randn(24, DS)
    assert dynamo.explain(moe)(x).graph_break_count == 0
    want = moe(x).output
    torch.testing.assert_close(torch.compile(moe, fullgraph=True)(x).output, want)
    torch.testing.assert_close(torch.export.export(moe, (x,)).module()(x).output, want)
