"""EarlyExit equals the per-sample loop; calibration matches a measured run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaptnet
from adaptnet import EarlyExit, calibrate_exits
from adaptnet.errors import DynamicError

D, C = 6, 4


def make(rule="max_prob", threshold=0.5, n=3) -> EarlyExit:
    stages = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(n)]
    heads = [nn.Linear(D, C) for _ in range(n)]
    return EarlyExit(stages, heads, rule=rule, threshold=threshold)


def per_sample(model, x):
    rs = [model(x[i:i + 1]) for i in range(x.shape[0])]
    return torch.cat([r.output for r in rs]), torch.cat([r.exit_index for r in rs])


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 10), rule=st.sampled_from(["max_prob", "entropy"]),
       seed=st.integers(0, 2**16))
def test_evaluation_equals_per_sample_loop(B, rule, seed):
    torch.manual_seed(seed)
    thr = 0.4 if rule == "max_prob" else 1.2
    model = make(rule, thr).double().eval()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    r = model(x)
    logits, index = per_sample(model, x)
    torch.testing.assert_close(r.output, logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(r.exit_index, index)
    w = torch.randn(B, C, dtype=torch.float64)
    wrt = [x, *model.parameters()]
    g1 = torch.autograd.grad((r.output * w).sum(), wrt, materialize_grads=True)
    g2 = torch.autograd.grad((logits * w).sum(), wrt, materialize_grads=True)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_exit_decisions_follow_the_criterion():
    torch.manual_seed(0)
    model = make("entropy", 1.0).eval()
    x = torch.randn(32, D)
    r = model(x)
    exits = model.all_exits(x)
    for i in range(32):
        for j, z in enumerate(exits):
            p = torch.softmax(z[i], -1)
            if j == len(exits) - 1 or -(p * p.log()).sum() <= 1.0:
                assert r.exit_index[i] == j
                torch.testing.assert_close(r.output[i], z[i])
                break


def test_training_computes_every_exit_and_the_joint_loss():
    model = make(n=3)
    model.train()
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    r = model(x)
    assert len(r.exit_logits) == 3 and r.exit_index.tolist() == [2] * 8
    expected = sum(F.cross_entropy(z, y) for z in model.all_exits(x))
    torch.testing.assert_close(r.joint_loss(y), expected)
    r.joint_loss(y).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(DynamicError, match="only training mode computes"):
        model.eval()(x).joint_loss(y)


@pytest.mark.parametrize(("threshold", "expected"), [(1e-9, 0), (1.0, 2)])
def test_everyone_at_the_first_or_the_last_exit(threshold, expected):
    r = make("max_prob", threshold).eval()(torch.randn(5, D))
    assert r.exit_index.tolist() == [expected] * 5


def test_later_stages_run_only_on_remaining_samples():
    model = make("max_prob", 0.3).eval()
    x = torch.randn(40, D)
    with adaptnet.count_macs() as m:
        r = model(x)
    costs = model.exit_macs(x[:1])
    assert m.total == sum(costs[i] for i in r.exit_index.tolist())


def test_a_nan_in_a_stage_an_exited_sample_never_runs_does_not_leak():
    class Boom(nn.Module):
        def forward(self, h):
            return torch.sqrt(-h[:, :1].abs() - 1).expand_as(h) + h  # NaN for everyone

    class Confident(nn.Module):  # certain for samples whose first feature is positive
        def forward(self, h):
            return torch.stack([(h[:, 0] > 0).float() * 50 + h[:, 1], torch.zeros(len(h))], 1)

    model = EarlyExit([nn.Identity(), Boom()], [Confident(), nn.Linear(D, 2)], threshold=0.9)
    x = torch.randn(6, D).abs().requires_grad_()
    r = model.eval()(x)
    r.output.sum().backward()
    assert r.exit_index.tolist() == [0] * 6
    assert torch.isfinite(r.output).all() and torch.isfinite(x.grad).all()


def test_batch_of_one_and_empty_batch():
    model = make().eval()
    assert model(torch.randn(1, D)).output.shape == (1, C)
    empty = model(torch.zeros(0, D))
    assert empty.output.shape == (0, C) and empty.exit_index.shape == (0,)


# --------------------------------------------------------------------------- calibration


def trained_exit_model():
    """A 3-exit model on a task where the first exit is good for half of the samples."""
    torch.manual_seed(0)
    x = torch.randn(600, D)
    easy = x[:, 0] > 0
    y = torch.where(easy, (x[:, 1] > 0).long(), ((x[:, 2] * x[:, 3]) > 0).long() + 2)
    model = make(n=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        model.train()(x).joint_loss(y).backward()
        opt.step()
    return model, x[:300], y[:300]


@pytest.mark.parametrize("target", [{"target_accuracy": 0.8}, {"target_compute": 0.6}])
def test_calibration_meets_its_target_and_matches_a_measured_run(target):
    model, x, y = trained_exit_model()
    cal = calibrate_exits(model, x, y, **target)
    if "target_accuracy" in target:
        assert cal.accuracy >= 0.8
    else:
        assert cal.compute_fraction <= 0.6
    assert model.thresholds == (cal.threshold, cal.threshold)
    # The simulated figures are what an actual evaluation run does:
    model.eval()
    with adaptnet.count_macs() as m:
        r = model(x)
    assert (r.output.argmax(-1) == y).float().mean().item() == pytest.approx(cal.accuracy)
    assert m.total / len(x) == pytest.approx(cal.mean_macs)
    fractions = torch.bincount(r.exit_index, minlength=3).double() / len(x)
    assert tuple(fractions.tolist()) == pytest.approx(cal.exit_fractions)
    with adaptnet.count_macs() as full:
        h = x[:1]
        for stage in model.stages:
            h = stage(h)
        model.heads[-1](h)
    assert cal.full_macs == full.total


def test_calibration_for_accuracy_picks_the_cheapest_sufficient_threshold():
    model, x, y = trained_exit_model()
    final = (model.all_exits(x)[-1].argmax(-1) == y).float().mean().item()
    loose = calibrate_exits(model, x, y, target_accuracy=0.6)
    strict = calibrate_exits(model, x, y, target_accuracy=final)  # as good as no early exit
    assert loose.accuracy >= 0.6 and strict.accuracy >= final
    assert loose.mean_macs <= strict.mean_macs <= model.exit_macs(x[:1])[-1]


def test_calibration_errors():
    model, x, y = trained_exit_model()
    with pytest.raises(DynamicError, match="exactly one of target_accuracy and target_compute"):
        calibrate_exits(model, x, y)
    with pytest.raises(DynamicError, match=r"target must lie in \(0, 1\], got 1.5"):
        calibrate_exits(model, x, y, target_accuracy=1.5)
    with pytest.raises(DynamicError, match=r"no threshold reaches the target accuracy 1.0; the "
                                           r"exits reach \["):
        calibrate_exits(model, x, y, target_accuracy=1.0)
    with pytest.raises(DynamicError, match=r"cheapest \(everyone at the first exit\) is 0\.\d+ "
                                           "of the full network"):
        calibrate_exits(model, x, y, target_compute=0.01)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: EarlyExit([nn.Identity()], [nn.Identity(), nn.Identity()]),
         r"need one head per stage, got 1 stage\(s\) and 2 head\(s\)"),
        (lambda: EarlyExit([], []), "need one head per stage, got 0"),
        (lambda: make(rule="margin"), "rule must be one of"),
        (lambda: make(threshold=0.0), r"max_prob thresholds must lie in \(0, 1\], got \[0.0, "),
        (lambda: make("entropy", threshold=-1), r"entropy thresholds must lie in \[0, inf\)"),
        (lambda: make(threshold=[0.5, 0.5, 0.5]),
         r"thresholds needs one value or 2 \(one per early exit\), got 3"),
        (lambda: EarlyExit([nn.Identity()] * 2, [nn.Identity()] * 2, weights=[1.0]),
         r"weights needs one value per exit \(2\), got 1"),
    ],
)
def test_bad_arguments_are_dynamic_errors(build, match):
    with pytest.raises(DynamicError, match=match):
        build()


@pytest.mark.slow
def test_eager_parity_under_torch_compile():
    model = make("max_prob", 0.4).eval()
    x = torch.randn(9, D)
    compiled = torch.compile(model, backend="aot_eager")  # exit decisions break the graph
    a, b = compiled(x), model(x)
    torch.testing.assert_close(a.output, b.output)
    assert torch.equal(a.exit_index, b.exit_index)
