"""AdaptiveDepth equals the per-sample loop, and ACT equals Graves' equations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaptnet
from adaptnet import AdaptiveDepth
from adaptnet.dynamic import ACTHalting, PonderNetHalting, ThresholdHalting
from adaptnet.errors import DynamicError

D = 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (b, D) -> (b, D)
        return torch.tanh(self.lin(s)) + s


def make(policy: str, pool: int = 1, max_steps: int = 5, **kw) -> AdaptiveDepth:
    head = nn.Linear(D, 1)
    halting = ThresholdHalting(head, **kw) if policy == "threshold" else ACTHalting(head, **kw)
    order = None if pool == 1 else [t % pool for t in range(max_steps)]
    return AdaptiveDepth([Block() for _ in range(pool)], halting, max_steps, order)


def loss_and_grads(model, x, run):
    """Run ``run`` (batched or per-sample), backprop a fixed random loss, return everything."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, steps, ponder, loss = run(model, x)
    loss.backward()
    g = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
         for n, p in model.named_parameters()}
    g["input"] = x.grad.clone()
    return out.detach(), steps, ponder.detach(), g


def batched(weights):
    def run(model, x):
        r = model(x)
        return r.output, r.steps, r.ponder, (r.output * weights).sum() + r.aux_loss * x.shape[0]
    return run


def per_sample(weights):
    def run(model, x):
        rs = [model(x[i:i + 1]) for i in range(x.shape[0])]
        loss = sum((r.output * weights[i]).sum() + r.aux_loss for i, r in enumerate(rs))
        return (torch.cat([r.output for r in rs]), torch.cat([r.steps for r in rs]),
                torch.cat([r.ponder for r in rs]), loss)
    return run


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 9), policy=st.sampled_from(["threshold", "act"]),
       pool=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_equals_per_sample_loop(B, policy, pool, seed):
    torch.manual_seed(seed)
    kw = {"threshold": 0.6} if policy == "threshold" else {"eps": 0.05, "time_penalty": 0.1}
    model = make(policy, pool, **kw).double()
    with torch.no_grad():
        model.halting.head.bias.fill_(-1.0)  # a spread of halting steps
    x = torch.randn(B, D, dtype=torch.float64) * 2
    w = torch.randn(B, D, dtype=torch.float64)
    got = loss_and_grads(model, x, batched(w))
    want = loss_and_grads(model, x, per_sample(w))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def graves_act(block, head, s, max_steps, eps):
    """ACT for one sample, written from the paper's equations with Python floats for N."""
    cum, out = torch.zeros(()), torch.zeros_like(s)
    for n in range(1, max_steps + 1):
        s = block(s)
        h = torch.sigmoid(head(s)).squeeze()
        if cum + h >= 1 - eps or n == max_steps:
            R = 1 - cum
            return out + R * s, n, n + R
        out, cum = out + h * s, cum + h
    raise AssertionError("unreachable")


def test_act_matches_graves_equations():
    torch.manual_seed(3)
    model = make("act", max_steps=6, eps=0.01, time_penalty=0.0).double()
    x = torch.randn(7, D, dtype=torch.float64)
    r = model(x)
    for i in range(7):
        out, n, ponder = graves_act(model.blocks[0], model.halting.head, x[i:i + 1], 6, 0.01)
        torch.testing.assert_close(r.output[i:i + 1], out)
        assert r.steps[i] == n
        torch.testing.assert_close(r.ponder[i], ponder)
    assert r.steps.min() < r.steps.max()  # the case exercises different depths


def test_threshold_output_is_the_state_after_the_halting_step():
    torch.manual_seed(0)
    model = make("threshold", max_steps=8, threshold=0.5)
    x = torch.randn(6, D)
    r = model(x)
    for i in range(6):
        s, n = x[i:i + 1], 0
        while True:
            s, n = model.blocks[0](s), n + 1
            if torch.sigmoid(model.halting.head(s)).item() >= 0.5 or n == 8:
                break
        torch.testing.assert_close(r.output[i:i + 1], s)
        assert r.steps[i] == n and r.ponder[i] == n


@pytest.mark.parametrize(("bias", "steps"), [(50.0, 1), (-50.0, 5)])
def test_all_halt_at_once_or_all_run_to_max_steps(bias, steps):
    model = make("threshold", max_steps=5, threshold=0.5)
    with torch.no_grad():
        model.halting.head.weight.zero_()
        model.halting.head.bias.fill_(bias)
    r = model(torch.randn(4, D))
    assert r.steps.tolist() == [steps] * 4


def test_only_unfinished_samples_run_the_next_step():
    calls = []

    class Counting(Block):
        def forward(self, s):
            calls.append(s.shape[0])
            return super().forward(s)

    head = nn.Linear(D, 1)
    model = AdaptiveDepth(Counting(), ThresholdHalting(head, 0.5), max_steps=6)
    r = model(torch.randn(16, D))
    assert sum(calls) == int(r.steps.sum())  # compute follows the executed steps
    assert calls == sorted(calls, reverse=True)


def test_a_nan_in_a_step_a_halted_sample_never_runs_does_not_leak():
    class Gate(nn.Module):  # halts samples whose first feature is positive
        def forward(self, s):
            return (s[:, 0] > 0).float() * 100 - 50

    class SqrtOfNeg(nn.Module):  # NaN for any sample with a positive first feature
        def forward(self, s):
            return torch.sqrt(-s[:, :1]).expand_as(s) * 0 + s

    x = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [2.0, 0.0]], requires_grad=True)
    model = AdaptiveDepth([nn.Identity(), SqrtOfNeg()], ThresholdHalting(Gate()), max_steps=3,
                          order=[0, 1, 1])
    r = model(x)
    r.output.sum().backward()
    assert torch.isfinite(r.output).all() and torch.isfinite(x.grad).all()
    assert r.steps.tolist() == [1, 3, 1]


def test_batch_of_one_empty_batch_and_no_grad():
    model = make("act")
    assert model(torch.randn(1, D)).output.shape == (1, D)
    empty = model(torch.zeros(0, D))
    assert empty.output.shape == (0, D) and empty.steps.shape == (0,)
    with torch.no_grad():
        assert not model(torch.randn(3, D)).output.requires_grad


def test_act_aux_loss_trains_the_halting_unit():
    model = make("act", time_penalty=1.0)
    r = model(torch.randn(5, D))
    r.aux_loss.backward()
    assert model.halting.head.weight.grad.abs().sum() > 0  # through the remainder R
    torch.testing.assert_close(r.aux_loss, r.ponder.mean())


@pytest.mark.slow
def test_eager_parity_under_torch_compile():
    model = make("act", max_steps=4)
    x = torch.randn(6, D)
    compiled = torch.compile(model, backend="aot_eager")  # data-dependent halting breaks graphs
    a, b = compiled(x), model(x)
    torch.testing.assert_close(a.output, b.output)
    assert torch.equal(a.steps, b.steps)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: AdaptiveDepth(Block(), ACTHalting(nn.Linear(D, 1)), max_steps=0),
         r"max_steps must be an integer >= 1, got 0"),
        (lambda: AdaptiveDepth([Block(), Block()], ACTHalting(nn.Linear(D, 1)), 3,
                               order=[0, 2, 1]),
         r"order must list 3 block indices \(one per step\) in \[0, 2\), got \[0, 2, 1\]"),
        (lambda: AdaptiveDepth(Block(), ACTHalting(nn.Linear(D, 1)), 3, order=[0, 0]),
         "order must list 3 block indices"),
        (lambda: AdaptiveDepth([], ACTHalting(nn.Linear(D, 1)), 3), "blocks is empty"),
        (lambda: AdaptiveDepth(Block(), nn.Linear(D, 1), 3),
         "halting must be an nn.Module implementing HaltingPolicy .* got Linear"),
        (lambda: PonderNetHalting(nn.Linear(D, 1), lambda_p=0.0),
         r"lambda_p must lie in \(0, 1\), got 0.0"),
        (lambda: PonderNetHalting(nn.Linear(D, 1), eps=1.0), r"eps must lie in \(0, 1\)"),
        (lambda: PonderNetHalting(nn.Linear(D, 1), beta=-0.1), "beta must be finite and >= 0"),
        (lambda: ThresholdHalting(nn.Linear(D, 1), threshold=0.0),
         r"threshold must lie in \(0, 1\], got 0.0"),
        (lambda: ThresholdHalting(nn.Linear(D, 1), threshold=1.5), "got 1.5"),
        (lambda: ACTHalting(nn.Linear(D, 1), eps=1.0), r"eps must lie in \(0, 1\), got 1.0"),
        (lambda: ACTHalting(nn.Linear(D, 1), time_penalty=-1),
         "time_penalty must be finite and >= 0"),
        (lambda: AdaptiveDepth(nn.Linear(D, 3), ACTHalting(nn.Linear(D, 1)), 2)(
            torch.randn(2, D)), r"block 0 maps \[2, 4\] to \[2, 3\]; blocks must keep"),
        (lambda: AdaptiveDepth(Block(), ACTHalting(nn.Linear(D, 2)), 2)(torch.randn(3, D)),
         r"halting head must return \(b,\) or \(b, 1\) logits for b = 3 states, got \[3, 2\]"),
    ],
)
def test_bad_arguments_are_dynamic_errors(build, match):
    with pytest.raises(DynamicError, match=match):
        build()


def test_weight_tied_depth_is_one_tensor_per_block():
    model = make("act", pool=2, max_steps=6)
    assert model.order == (0, 1, 0, 1, 0, 1)
    s = adaptnet.summary(model)
    assert s.unique == 2 * (D * D + D) + (D + 1)


# --------------------------------------------------------------------------- PonderNet


def pondernet(max_steps=6, **kw) -> AdaptiveDepth:
    torch.manual_seed(5)
    model = AdaptiveDepth(Block(), PonderNetHalting(nn.Linear(D, 1), **kw), max_steps).double()
    with torch.no_grad():
        model.halting.head.bias.fill_(-1.0)
    return model


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 8), training=st.booleans(), seed=st.integers(0, 2**16))
def test_pondernet_equals_per_sample_loop(B, training, seed):
    model = pondernet(beta=0.3).train(training)
    torch.manual_seed(seed)
    x = torch.randn(B, D, dtype=torch.float64) * 2
    per_step = torch.randn(B, 6, D, dtype=torch.float64)

    def run(inputs):
        r = model(inputs)
        extra = r.expected_loss((r.step_states * per_step[:len(inputs)]).sum(-1))
        return r, extra

    r, loss = run(x)
    (loss + r.aux_loss).backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0
    rows = []
    for i in range(B):
        ri = model(x[i:i + 1])
        li = ri.expected_loss((ri.step_states * per_step[i:i + 1]).sum(-1))
        total = total + li + ri.aux_loss
        rows.append(ri)
    (total / B).backward()
    names = ("steps", "halting", "step_states") + (() if training else ("output",))
    for name in names:  # the training output is sampled: see the test below
        torch.testing.assert_close(getattr(r, name), torch.cat([getattr(ri, name) for ri in rows]),
                                   rtol=1e-12, atol=1e-12)
    for a, p in zip(g, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


def test_pondernet_matches_the_papers_equations():
    model = pondernet(max_steps=6, eps=0.05, lambda_p=0.3, beta=1.0).train()
    x = torch.randn(5, D, dtype=torch.float64)
    r = model(x)
    prior = torch.tensor([0.3 * 0.7**n for n in range(6)], dtype=torch.float64)
    prior = prior / prior.sum()
    kls = []
    for i in range(5):
        s, unhalted, p = x[i:i + 1], 1.0, []
        for n in range(6):
            s = model.blocks[0](s)
            lam = 1.0 if n == 5 else torch.sigmoid(model.halting.head(s)).item()
            if unhalted * (1 - lam) <= 0.05 or n == 5:
                p.append(unhalted)  # the remaining mass at the last executed step
                break
            p.append(unhalted * lam)
            unhalted *= 1 - lam
        row = torch.tensor(p + [0.0] * (6 - len(p)), dtype=torch.float64)
        torch.testing.assert_close(r.halting[i], row)
        assert r.steps[i] == len(p)
        nz = row > 0
        kls.append((row[nz] * (row[nz].log() - prior[nz].log())).sum())
    torch.testing.assert_close(r.halting.sum(1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(r.aux_loss, torch.stack(kls).mean())


def test_pondernet_training_output_is_sampled_from_the_halting_distribution():
    model = pondernet(max_steps=6, eps=0.01).train()
    x = torch.randn(1, D, dtype=torch.float64).expand(4000, D)  # one sample, many draws
    torch.manual_seed(0)
    r = model(x)
    chosen = (r.output[:, None] == r.step_states).all(-1).double().argmax(1)
    assert ((r.output[:, None] == r.step_states).all(-1).any(1)).all()  # always a real step
    frequencies = torch.bincount(chosen, minlength=6).double() / 4000
    assert (frequencies - r.halting[0]).abs().max() < 0.03
    assert r.halting[0].count_nonzero() > 2  # several steps are likely


def test_pondernet_evaluation_halts_at_the_median():
    model = pondernet(max_steps=8).eval()
    x = torch.randn(6, D, dtype=torch.float64)
    r = model(x)
    cum = r.halting.cumsum(1)
    for i in range(6):
        n = int(r.steps[i])
        assert cum[i, n - 1] >= 0.5 - 1e-12 and (n == 1 or cum[i, n - 2] < 0.5)
        torch.testing.assert_close(r.output[i], r.step_states[i, n - 1])


def test_pondernet_empty_batch_has_an_empty_halting_distribution():
    r = pondernet()(torch.zeros(0, D, dtype=torch.float64))
    assert r.halting.shape == (0, 6) and r.step_states.shape == (0, 6, D)
    assert r.expected_loss(torch.zeros(0, 6, dtype=torch.float64)).isnan()  # mean of nothing


def test_expected_loss_errors():
    r = make("act")(torch.randn(3, D))
    with pytest.raises(DynamicError, match="needs PonderNetHalting"):
        r.expected_loss(torch.zeros(3, 5))
    p = pondernet()(torch.randn(3, D, dtype=torch.float64))
    with pytest.raises(DynamicError, match=r"per_step_loss must have shape \[3, 6\]"):
        p.expected_loss(torch.zeros(3, 5))


# --------------------------------------------------------------------------- nesting


class BranchyBlock(nn.Module):
    """A block that routes each sample through one of two layers (a branch inside a step)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, s):
        return s + adaptnet.branch(s[:, 0] > 0, lambda v: torch.tanh(self.a(v)),
                                   lambda v: torch.sin(self.b(v)), s)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_a_branch_inside_an_adaptive_depth_step_equals_per_sample_loop(B, seed):
    torch.manual_seed(seed)
    model = AdaptiveDepth(BranchyBlock(), ACTHalting(nn.Linear(D, 1), eps=0.1, time_penalty=0.1),
                          max_steps=5).double()
    with torch.no_grad():
        model.halting.head.bias.fill_(-1.0)
    x = torch.randn(B, D, dtype=torch.float64)
    w = torch.randn(B, D, dtype=torch.float64)
    got = loss_and_grads(model, x, batched(w))
    want = loss_and_grads(model, x, per_sample(w))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], want[1])
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-10, atol=1e-12)
