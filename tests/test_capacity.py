"""Capacity mode: static shapes, whole-graph compile, export and ONNX, against the loop oracle.

The oracle for a capacity-mode model is the per-sample loop *given the same
selection*: each sample, run alone for the steps (or to the exit) the batched
call assigned it, must give the same output and gradients; and the selection
itself must follow the rule (at each decision, ``ceil(capacity * b)`` of the
``b`` active rows go on, the least confident / least halted).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import adaptnet
from adaptnet.errors import DynamicError

D = 6


def exits(capacity: float, n: int = 3, seed: int = 0) -> adaptnet.EarlyExit:
    torch.manual_seed(seed)
    return adaptnet.EarlyExit([nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(n)],
                              [nn.Linear(D, 4) for _ in range(n)], capacity=capacity).eval()


def depth(policy: str, capacity: float, steps: int = 4, seed: int = 0) -> adaptnet.AdaptiveDepth:
    torch.manual_seed(seed)
    head = nn.Linear(D, 1)
    halting = {"threshold": adaptnet.dynamic.ThresholdHalting(head),
               "act": adaptnet.dynamic.ACTHalting(head),
               "pondernet": adaptnet.dynamic.PonderNetHalting(head)}[policy]
    return adaptnet.AdaptiveDepth(nn.Sequential(nn.Linear(D, D), nn.Tanh()), halting, steps,
                                  capacity=capacity).eval()


def moe(factor: float | None = None, fixed: bool = False) -> adaptnet.MoE:
    torch.manual_seed(0)
    return adaptnet.MoE([nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, D))
                         for _ in range(4)], nn.Linear(D, 4), k=2, capacity_factor=factor,
                        fixed_slots=fixed)


def active_counts(B: int, capacity: float, decisions: int) -> list[int]:
    """Rows active at each step under the rule: b -> ceil(capacity * b)."""
    counts = [B]
    for _ in range(decisions):
        counts.append(math.ceil(capacity * counts[-1]))
    return counts


# ---------------------------------------------------------------- route_topk


@pytest.mark.parametrize("B,k", [(9, 4), (9, 0), (9, 9), (1, 1), (1, 0), (0, 0)])
def test_route_topk_equals_the_loop_given_its_selection(B, k):
    torch.manual_seed(B + k)
    fn, other = nn.Linear(D, 3), nn.Linear(D, 3)
    x = torch.randn(B, D, requires_grad=True)
    scores = torch.randn(B)
    out = adaptnet.route_topk(scores, k, fn, x, other=other)
    chosen = set(scores.argsort(descending=True)[:k].tolist())
    rows = [(fn if i in chosen else other)(x[i:i + 1]) for i in range(B)]
    ref = torch.cat(rows) if rows else torch.zeros(0, 3)
    torch.testing.assert_close(out, ref)
    if B:
        g_out = torch.autograd.grad(out.square().sum(), [x, *fn.parameters()], allow_unused=True)
        g_ref = torch.autograd.grad(ref.square().sum(), [x, *fn.parameters()], allow_unused=True)
        for a, b in zip(g_out, g_ref, strict=True):
            if a is None or b is None:
                assert (a is None and b is None) or k == 0
            else:
                torch.testing.assert_close(a, b)


def test_route_topk_without_other_passes_the_rest_through():
    x = torch.arange(5.0).view(5, 1)
    out = adaptnet.route_topk(torch.tensor([0.0, 3.0, 1.0, 4.0, 2.0]), 2, lambda v: v * 10, x)
    assert out.flatten().tolist() == [0.0, 10.0, 2.0, 30.0, 4.0]


@pytest.mark.slow
def test_route_topk_compiles_whole_and_matches_eager():
    block, other = nn.Linear(D, 2), nn.Linear(D, 2)

    def f(x):
        return adaptnet.route_topk(x[:, 0], x.shape[0] // 2, block, x, other=other)

    x = torch.randn(16, D)
    explained = dynamo.explain(f)(x)
    assert explained.graph_break_count == 0
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.parametrize("call,match", [
    (lambda x: adaptnet.route_topk(torch.randn(4), 2, nn.Identity(), x), r"shape \(5,\)"),
    (lambda x: adaptnet.route_topk(torch.arange(5), 2, nn.Identity(), x), "floating"),
    (lambda x: adaptnet.route_topk(torch.randn(5), 6, nn.Identity(), x),
     "k must be an integer from 0 to the batch size 5, got 6"),
    (lambda x: adaptnet.route_topk(torch.randn(5), -1, nn.Identity(), x), "got -1"),
    (lambda x: adaptnet.route_topk(torch.randn(5), 2.5, nn.Identity(), x), "got 2.5"),
    (lambda x: adaptnet.route_topk(torch.randn(5), 2, nn.Linear(D, 3), x),
     "fn must keep x's shape"),
    (lambda x: adaptnet.route_topk(torch.randn(5), 2, "f", x), "callables"),
    (lambda x: adaptnet.route_topk(torch.randn(5), 2, nn.Identity(), 3.0), "x must be"),
])
def test_route_topk_bad_input_is_a_typed_error(call, match):
    with pytest.raises(DynamicError, match=match):
        call(torch.randn(5, D))


# ---------------------------------------------------------------- EarlyExit


def exit_oracle(net: adaptnet.EarlyExit, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each sample alone, through the stages up to its exit, read at that exit."""
    rows = []
    for i in range(x.shape[0]):
        h = x[i:i + 1]
        for s in range(int(index[i]) + 1):
            h = net.stages[s](h)
        rows.append(net.heads[int(index[i])](h))
    return torch.cat(rows)


@pytest.mark.parametrize("capacity", [0.5, 0.3, 1.0])
@pytest.mark.parametrize("B", [1, 2, 13, 32])
def test_early_exit_capacity_follows_the_rule_and_the_loop(capacity, B):
    net = exits(capacity)
    x = torch.randn(B, D, requires_grad=True)
    r = net(x)
    # The selection: how many reach each exit is fixed by B alone ...
    counts = active_counts(B, capacity, len(net.heads) - 1)
    reached = [int((r.exit_index >= i).sum()) for i in range(len(net.heads))]
    assert reached == counts
    # ... and those that go on past exit i are the least confident among those reaching it.
    with torch.no_grad():
        every = net.all_exits(x)
    for i in range(len(net.heads) - 1):
        here = (r.exit_index >= i).nonzero().squeeze(1)
        conf = torch.softmax(every[i][here], -1).amax(-1)
        went_on = r.exit_index[here] > i
        if went_on.any() and (~went_on).any():
            assert conf[went_on].max() <= conf[~went_on].min()
    ref = exit_oracle(net, x, r.exit_index)
    torch.testing.assert_close(r.output, ref)
    params = [x, *net.parameters()]
    g = torch.autograd.grad(r.output.sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for p, a, b in zip(params, g, g_ref, strict=True):  # a head whose logits were all
        zero = torch.zeros_like(p)                      # overwritten gets zeros, not None
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b)


@pytest.mark.slow
def test_early_exit_capacity_compiles_whole_and_exports():
    net = exits(0.5)
    x = torch.randn(16, D)
    assert dynamo.explain(net)(x).graph_break_count == 0
    compiled = torch.compile(net, fullgraph=True)
    mixed = torch.randn(16, D) * torch.linspace(0.1, 3, 16)[:, None]  # easy and hard rows
    r, rc = net(mixed), compiled(mixed)
    torch.testing.assert_close(rc.output, r.output)
    assert torch.equal(rc.exit_index, r.exit_index)
    assert len(set(r.exit_index.tolist())) == 3  # the batch really is mixed
    program = torch.export.export(net, (x,))
    re = program.module()(mixed)
    torch.testing.assert_close(re.output, r.output)
    assert torch.equal(re.exit_index, r.exit_index)


def test_training_runs_every_exit_in_capacity_mode_too():
    net = exits(0.5).train()
    r = net(torch.randn(8, D))
    assert len(r.exit_logits) == 3 and (r.exit_index == 2).all()


# ---------------------------------------------------------------- AdaptiveDepth


def depth_oracle(model: adaptnet.AdaptiveDepth, policy: str, x: torch.Tensor,
                 steps: torch.Tensor) -> torch.Tensor:
    """Each sample alone, for the steps the batched call gave it, with the policy's weights."""
    rows = []
    for i in range(x.shape[0]):
        state, cum, acc = x[i:i + 1], torch.zeros(1), None
        n = int(steps[i])
        for t in range(n):
            state = model.blocks[model.order[t]](state)
            if policy == "act":
                h = torch.sigmoid(model.halting.head(state)).view(1)
                w = 1.0 - cum if t == n - 1 else torch.minimum(h, 1.0 - cum)
                acc = w.view(1, 1) * state + (0 if acc is None else acc)
                cum = cum + w
        rows.append(acc if policy == "act" else state)
    return torch.cat(rows)


@pytest.mark.parametrize("policy", ["threshold", "act", "pondernet"])
@pytest.mark.parametrize("capacity,B", [(0.5, 13), (0.7, 32), (1.0, 5), (0.5, 1)])
def test_adaptive_depth_capacity_follows_the_rule_and_the_loop(policy, capacity, B):
    model = depth(policy, capacity)
    x = torch.randn(B, D, requires_grad=True)
    r = model(x)
    counts = active_counts(B, capacity, model.max_steps - 1)
    assert [int((r.steps > t).sum()) for t in range(model.max_steps)] == counts
    ref = depth_oracle(model, policy, x, r.steps)
    torch.testing.assert_close(r.output, ref)
    g = torch.autograd.grad(r.output.sum(), [x, *model.blocks.parameters()])
    g_ref = torch.autograd.grad(ref.sum(), [x, *model.blocks.parameters()])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_adaptive_depth_capacity_lets_the_least_halted_go_on():
    model = depth("threshold", 0.5, steps=2)
    x = torch.randn(20, D)
    r = model(x)
    with torch.no_grad():
        p = torch.sigmoid(model.halting.head(model.blocks[0](x))).view(-1)
    assert p[r.steps == 2].max() <= p[r.steps == 1].min()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["threshold", "act", "pondernet"])
def test_adaptive_depth_capacity_compiles_whole_and_exports(policy):
    model = depth(policy, 0.5)
    x = torch.randn(16, D)
    assert dynamo.explain(model)(x).graph_break_count == 0
    mixed = torch.randn(16, D) * 2
    r = model(mixed)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(mixed).output, r.output)
    program = torch.export.export(model, (x,))
    re = program.module()(mixed)
    torch.testing.assert_close(re.output, r.output)
    assert torch.equal(re.steps, r.steps)


# ---------------------------------------------------------------- MoE


@pytest.mark.parametrize("n", [1, 7, 32])
def test_moe_fixed_slots_equal_the_same_capacity_factor(n):
    x = torch.randn(n, D, requires_grad=True)
    static, exact = moe(0.5, fixed=True), moe(0.5)
    a, b = static(x), exact(x)
    torch.testing.assert_close(a.output, b.output)
    assert torch.equal(a.dropped, b.dropped)
    params = [x, *static.parameters()]  # the same weights: both built from seed 0
    ga = torch.autograd.grad(a.output.square().sum(), params, allow_unused=True)
    gb = torch.autograd.grad(b.output.square().sum(), [x, *exact.parameters()],
                             allow_unused=True)
    for p, u, v in zip(params, ga, gb, strict=True):  # static runs idle experts on padding
        zero = torch.zeros_like(p)                    # rows of weight 0: zeros, not None
        torch.testing.assert_close(zero if u is None else u, zero if v is None else v)


@pytest.mark.slow
def test_moe_fixed_slots_compile_whole_and_export():
    model = moe(1.0, fixed=True).eval()
    x = torch.randn(24, D)
    assert dynamo.explain(model)(x).graph_break_count == 0
    r = model(x)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x).output, r.output)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x).output, r.output)


# ---------------------------------------------------------------- ONNX


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None or
                    importlib.util.find_spec("onnxruntime") is None,
                    reason="the dev extra installs onnxscript and onnxruntime")
@pytest.mark.parametrize("build", [lambda: exits(0.5), lambda: depth("act", 0.5),
                                   lambda: moe(1.0, fixed=True).eval()],
                         ids=["exit", "act", "moe"])
def test_capacity_models_export_to_onnx_and_run_in_onnxruntime(build, tmp_path):
    import onnxruntime

    model = build()
    x = torch.randn(16, D)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    mixed = torch.randn(16, D) * torch.linspace(0.1, 3, 16)[:, None]
    got = session.run(None, {session.get_inputs()[0].name: mixed.numpy()})
    torch.testing.assert_close(torch.from_numpy(got[0]), model(mixed).output.detach(),
                               rtol=1e-5, atol=1e-5)


def test_the_capacity_count_is_exact_integer_arithmetic():
    """ceil(capacity * rows) in integers: floats round (0.7 * 10 is 7.000000000000001), and
    an exported graph rounded 0.3 * 100 up in float32 (31 rows on, not 30)."""
    from adaptnet.dynamic._partition import capacity_rows

    assert capacity_rows(0.7, 10) == 7 and capacity_rows(0.3, 100) == 30
    assert capacity_rows(0.125, 64) == 8 and capacity_rows(1 / 3, 7) == 3
    assert [capacity_rows(0.3, n) for n in range(5)] == [0, 1, 1, 1, 2]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None or
                    importlib.util.find_spec("onnxruntime") is None,
                    reason="the dev extra installs onnxscript and onnxruntime")
def test_a_dynamic_batch_equals_eager_at_every_size_in_onnx_and_export(tmp_path):
    """Regression: exported to ONNX with a dynamic batch, 100 rows left at exits [69, 21, 10]
    where eager gives [70, 21, 9]. Dim.AUTO: ONNX equals eager at every batch size; a
    torch.export program equals it wherever every decision keeps 2 rows or more, and
    refuses the other sizes (its guard) rather than answer wrongly."""
    import onnxruntime
    from torch.export import Dim

    torch.manual_seed(0)
    model = adaptnet.EarlyExit([nn.Linear(32, 32) for _ in range(3)],
                               [nn.Linear(32, 5) for _ in range(3)], capacity=0.3).eval()
    example = (torch.randn(64, 32),)
    onnx = torch.onnx.export(model, example, dynamo=True, verbose=False,
                             dynamic_shapes=({0: Dim.AUTO},))
    onnx.save(str(tmp_path / "model.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    program = torch.export.export(model, example, dynamic_shapes=({0: Dim.AUTO},)).module()
    refused = []
    for n in range(1, 151):
        x = torch.randn(n, 32)
        want = model(x)
        logits, index = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:2]
        assert torch.equal(torch.from_numpy(index), want.exit_index), n
        torch.testing.assert_close(torch.from_numpy(logits), want.output.detach())
        try:
            got = program(x)
        except (AssertionError, RuntimeError):
            refused.append(n)
            continue
        assert torch.equal(got.exit_index, want.exit_index), n
    kept = [(3 * ((3 * n + 9) // 10) + 9) // 10 for n in range(1, 151)]  # rows at exit 3
    assert refused == [n for n, k in zip(range(1, 151), kept, strict=True) if k < 2]
    assert torch.bincount(model(torch.randn(100, 32)).exit_index).tolist() == [70, 21, 9]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("build,match", [
    (lambda: exits(0.0), r"capacity must be a fraction in \(0, 1\]"),
    (lambda: exits(1.5), "got 1.5"),
    (lambda: exits(True), "got True"),
    (lambda: adaptnet.EarlyExit([nn.Identity()] * 2, [nn.Linear(D, 2)] * 2, threshold=0.8,
                                capacity=0.5), "threshold=0.8 cannot be honoured"),
    (lambda: exits(0.5).set_thresholds(0.9), "capacity mode"),
    (lambda: adaptnet.calibrate_exits(exits(0.5), torch.randn(4, D), torch.zeros(4).long(),
                                      target_accuracy=0.5), "capacity mode"),
    (lambda: depth("act", -0.1), "capacity must be"),
    (lambda: moe(fixed=True), "fixed_slots=True runs every expert on exactly its slots"),
])
def test_capacity_bad_input_is_a_typed_error(build, match):
    with pytest.raises(DynamicError, match=match):
        build()


# ---------------------------------------------------------------- exact mode under compile


@pytest.mark.parametrize("name", ["exit", "depth", "branch"])
def test_exact_mode_breaks_only_at_its_data_dependent_decisions(name):
    from torch._dynamo.utils import counters

    x = torch.randn(16, D)
    if name == "exit":  # two decisions (exits 1 and 2), each taken by some rows
        f, allowed = exits(0.5), 2
        f.capacity = None
        f.set_thresholds(0.4)
    elif name == "depth":  # three decisions (after steps 1 to 3)
        f, allowed = depth("act", 0.5), 3
        f.capacity = None
        f.halting.eps = 0.9  # halting is likely but not certain at every step
    else:  # one decision, one nonzero per path, plus the frame of the loop over paths
        a, b = nn.Linear(D, D), nn.Linear(D, D)

        def f(x):
            return adaptnet.branch(x[:, 0] > 0, a, b, x)
        allowed = 3
    torch._dynamo.reset()
    counters.clear()
    torch.testing.assert_close(torch.compile(f)(x).output if name != "branch" else
                               torch.compile(f)(x), f(x).output if name != "branch" else f(x))
    breaks = counters["graph_break"]
    # Only nonzero breaks the graph: no bookkeeping (the ledger is a plain global).
    assert breaks and all("nonzero" in reason for reason in breaks)
    assert sum(breaks.values()) <= allowed
