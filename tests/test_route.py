"""branch / switch equal the per-sample Python loop: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaptnet
from adaptnet.errors import RoutingError

D, H, OUT = 5, 7, 3


class Paths(nn.Module):
    """Three paths; ``shared`` is used by all of them, so its gradient sums over paths."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(D, H)
        self.heads = nn.ModuleList(nn.Linear(H, OUT) for _ in range(3))
        self.bias = nn.Parameter(torch.randn(OUT))  # shared by the batch: closed over

    def path(self, k: int):
        def fn(x, extra):  # x: (b, D); extra: {"scale": float, "y": (b, OUT)}
            h = torch.tanh(self.shared(x)) if k != 1 else torch.relu(self.shared(x)) * 2
            out = self.heads[k](h) * extra["scale"] + self.bias + extra["y"] * k
            return out, h.sum(1, keepdim=True)
        return fn


def per_sample_loop(index, fns, *inputs):
    """The oracle: call each sample's path on that one sample, then concatenate."""
    B = index.shape[0]
    leaves, spec = pytree.tree_flatten(inputs)
    outs = []
    for i in range(B):
        sub = [v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() else v for v in leaves]
        outs.append(fns[int(index[i])](*pytree.tree_unflatten(sub, spec)))
    return pytree.tree_map(lambda *xs: torch.cat(xs), *outs)


def grads(model, x, outputs, weights):
    model.zero_grad(set_to_none=True)
    x.grad = None
    loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    if loss.requires_grad:
        loss.backward()
    named = {n: p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    named["input"] = x.grad if x.grad is not None else torch.zeros_like(x)
    return named


@settings(max_examples=60, deadline=None)
@given(choices=st.lists(st.integers(0, 2), min_size=0, max_size=12), seed=st.integers(0, 2**16))
def test_switch_equals_per_sample_loop(choices, seed):
    torch.manual_seed(seed)
    model = Paths().double()
    fns = [model.path(k) for k in range(3)]
    B = len(choices)
    index = torch.tensor(choices, dtype=torch.long)
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    extra = {"scale": 0.5, "y": torch.randn(B, OUT, dtype=torch.float64)}
    weights = [torch.randn(B, OUT, dtype=torch.float64), torch.randn(B, 1, dtype=torch.float64)]

    got = adaptnet.switch(index, fns, x, extra)
    g_got = grads(model, x, got, weights)
    if B == 0:
        assert got[0].shape == (0, OUT) and got[1].shape == (0, 1)
        assert all(torch.count_nonzero(g) == 0 for g in g_got.values())
        return
    want = per_sample_loop(index, fns, x, extra)
    g_want = grads(model, x, want, weights)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


@settings(max_examples=40, deadline=None)
@given(pred=st.lists(st.booleans(), min_size=1, max_size=10))
def test_branch_equals_per_sample_loop_in_float32(pred):
    model = Paths()
    then_fn, else_fn = model.path(0), model.path(1)
    B = len(pred)
    p = torch.tensor(pred)
    x = torch.randn(B, D, requires_grad=True)
    extra = {"scale": torch.tensor(2.0), "y": torch.randn(B, OUT)}
    got = adaptnet.branch(p, then_fn, else_fn, x, extra)
    want = per_sample_loop(p.long(), [else_fn, then_fn], x, extra)
    weights = [torch.randn(B, OUT), torch.randn(B, 1)]
    g_got, g_want = grads(model, x, got, weights), grads(model, x, want, weights)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-5, atol=1e-5)


def test_untaken_paths_are_never_called():
    def boom(v):
        raise AssertionError("an untaken path ran")

    x = torch.randn(4, 2)
    out = adaptnet.branch(torch.ones(4, dtype=torch.bool), lambda v: v + 1, boom, x)
    assert torch.equal(out, x + 1)
    out = adaptnet.switch(torch.tensor([0, 2, 2, 0]), [torch.neg, boom, torch.exp], x)
    assert torch.equal(out[[0, 3]], -x[[0, 3]]) and torch.equal(out[[1, 2]], x[[1, 2]].exp())


def test_a_nan_in_an_untaken_path_does_not_leak():
    x = torch.tensor([4.0, -1.0, 9.0, -4.0], requires_grad=True)
    pred = x < 0
    out = adaptnet.branch(pred, lambda v: v * 3, torch.sqrt, x)  # sqrt only sees v >= 0
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.tensor([0.25, 3.0, 1 / 6, 3.0]))
    # Masked execution, the approach adaptnet replaces, leaks the NaN into the gradient:
    x.grad = None
    torch.where(pred, x * 3, torch.sqrt(x)).sum().backward()
    assert torch.isnan(x.grad).any()


def test_nested_routing_and_no_grad():
    inner = lambda v: adaptnet.branch(v[:, 1] > 0, lambda u: u * 2, lambda u: u - 1, v)  # noqa: E731
    x = torch.randn(9, 2)
    idx = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    with torch.no_grad():
        got = adaptnet.switch(idx, [torch.neg, inner], x)
    want = per_sample_loop(idx, [torch.neg, inner], x)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad


def test_batch_of_one_and_all_on_one_path_skip_the_gather():
    x = torch.randn(1, 3)
    assert torch.equal(adaptnet.branch(torch.tensor([True]), torch.exp, torch.neg, x), x.exp())
    x = torch.randn(5, 3)
    out = adaptnet.switch(torch.full((5,), 1), [torch.neg, lambda v: v], x)
    assert out is x  # every sample on one path: the path's output, untouched


@pytest.mark.slow
def test_eager_parity_under_torch_compile():
    model = Paths()
    fns = [model.path(k) for k in range(3)]

    def f(index, x, extra):
        return adaptnet.switch(index, fns, x, extra)

    compiled = torch.compile(f, backend="aot_eager")  # nonzero() breaks the graph: not fullgraph
    x, index = torch.randn(6, D), torch.tensor([0, 2, 1, 1, 0, 2])
    extra = {"scale": 1.0, "y": torch.randn(6, OUT)}
    for a, b in zip(compiled(index, x, extra), f(index, x, extra), strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- bad input


X = torch.randn(4, 3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: adaptnet.branch(X[:, 0], torch.neg, torch.exp, X),
         r"pred must be a bool tensor of shape \(B,\), got a torch.float32 tensor; compare"),
        (lambda: adaptnet.branch([True] * 4, torch.neg, torch.exp, X),
         "pred must be a bool tensor of shape .*got list"),
        (lambda: adaptnet.branch(X > 0, torch.neg, torch.exp, X),
         r"pred must have shape \(B,\), got \[4, 3\]; give one decision per sample"),
        (lambda: adaptnet.branch(torch.ones(5, dtype=torch.bool), torch.neg, torch.exp, X),
         r"pred has batch size 5, but input tensor\(s\) \[\(0, \[4, 3\]\)\] \(position, shape\) "
         r"do not have 5 rows.*close over tensors shared by the whole batch"),
        (lambda: adaptnet.branch(torch.ones(4, dtype=torch.bool), lambda v, b: v + b,
                                 torch.sub, X, torch.zeros(3)),
         r"input tensor\(s\) \[\(1, \[3\]\)\]"),
        (lambda: adaptnet.branch(torch.ones(4, dtype=torch.bool), torch.neg, torch.exp, 1.0),
         "got no tensor inputs to split"),
        (lambda: adaptnet.switch(torch.tensor([0, 1, 3, 0]), [torch.neg, torch.exp], X),
         r"index values must lie in \[0, 2\) for 2 fns, got values from 0 to 3"),
        (lambda: adaptnet.switch(torch.tensor([0, -1, 1, 0]), [torch.neg, torch.exp], X),
         r"got values from -1 to 1"),
        (lambda: adaptnet.switch(torch.zeros(4), [torch.neg], X),
         r"index must be an integer tensor .* got a torch.float32 tensor; use index.long\(\)"),
        (lambda: adaptnet.switch(torch.zeros(4, dtype=torch.long), [], X),
         "fns must be a non-empty sequence of callables, got an empty sequence"),
        (lambda: adaptnet.switch(torch.zeros(4, dtype=torch.long), [1, torch.neg], X),
         r"non-empty sequence of callables, got \['int', 'builtin_function_or_method'\]"),
        (lambda: adaptnet.branch(torch.tensor([True, False, True, False]),
                                 lambda v: v[:, :2], torch.neg, X),
         r"then_fn returned \(B, 2\) torch.float32 at output 0 but else_fn returned \(B, 3\)"),
        (lambda: adaptnet.branch(torch.tensor([True, False, True, False]),
                                 torch.neg, lambda v: v.double(), X),
         r"then_fn returned \(B, 3\) torch.float32 at output 0 but else_fn returned \(B, 3\) "
         "torch.float64"),
        (lambda: adaptnet.branch(torch.tensor([True, False, True, False]),
                                 lambda v: (v, v), torch.neg, X),
         r"then_fn returned \(Tensor, Tensor\) but else_fn returned Tensor; all paths must "
         "return the same structure"),
        (lambda: adaptnet.branch(torch.tensor([True, False, True, True]),
                                 lambda v: v.sum(0, keepdim=True), torch.neg, X),
         r"then_fn was called on 3 sample\(s\) and returned \[1, 3\] at output 0; each path "
         "must return tensors with one row per sample"),
    ],
)
def test_bad_input_is_a_routing_error_naming_the_argument_and_fix(call, match):
    with pytest.raises(RoutingError, match=match):
        call()


def test_a_parameter_passed_as_input_is_refused_not_split():
    """A shared tensor that happens to have B rows: a Parameter is caught (issue 14, item 10)."""
    w = nn.Parameter(torch.randn(3, 3))
    x = torch.randn(3, 3)
    with pytest.raises(RoutingError, match=r"input\(s\) \[\(1, \[3, 3\]\)\] .* are "
                       r"nn.Parameters.*use it inside the path functions"):
        adaptnet.branch(x[:, 0] > 0, lambda v, m: v @ m, lambda v, m: -v @ m, x, w)
    out = adaptnet.branch(x[:, 0] > 0, lambda v: v @ w, lambda v: -v @ w, x)  # the fix
    expected = torch.where((x[:, 0] > 0)[:, None], x @ w, -x @ w)
    torch.testing.assert_close(out, expected)
