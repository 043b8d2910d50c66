"""The protocols the dynamic layer exposes: HaltingPolicy, DynamicResult; and cheap exit pooling."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptnet
from adaptnet.dynamic import Decision, Step
from adaptnet.errors import ConfigError
from adaptnet.models._parts import MeanPool


class FixedSteps(nn.Module):
    """A user's halting policy: sample b halts after (b % 3) + 1 steps (its first feature)."""

    per_step = False

    def start(self, b, like):
        return {"t": like.new_zeros(b)}

    def decide(self, state, carry, last):
        t = carry["t"] + 1
        return Decision((t >= state[:, 0].abs().ceil().clamp(1, 3)) | last, t, t)

    def settle(self, decision, carry, done):
        return Step(None, {"t": decision.h}, torch.ones_like(decision.h))

    def aux_loss(self, ponder, halting):
        return ponder.new_zeros(())

    def output(self, output, halting, states):
        return output


def test_a_policy_without_every_method_is_refused_when_built_naming_them():
    class NoOutput(FixedSteps):  # what AdaptiveDepth calls after the loop, left out
        output = None

    with pytest.raises(adaptnet.errors.DynamicError, match=r"HaltingPolicy \(per_step, start, "
                       r"decide, settle, aux_loss, output\)"):
        adaptnet.AdaptiveDepth(nn.Linear(4, 4), NoOutput(), max_steps=3)


def test_a_policy_of_ones_own_plugs_into_adaptive_depth_and_matches_the_loop():
    block = nn.Linear(4, 4)
    with torch.no_grad():
        block.weight.copy_(torch.eye(4))
        block.bias.zero_()
    depth = adaptnet.AdaptiveDepth(block, FixedSteps(), max_steps=5)
    assert isinstance(depth.halting, adaptnet.dynamic.HaltingPolicy)
    x = torch.tensor([[0.5, 1, 2, 3], [2.5, 0, 0, 1], [1.5, 1, 1, 1], [9.0, 0, 0, 0]])
    r = depth(x)
    assert r.steps.tolist() == [1, 3, 2, 3]
    for i in range(4):  # the loop: the block applied steps[i] times to sample i alone
        h = x[i:i + 1]
        for _ in range(int(r.steps[i])):
            h = block(h)
        torch.testing.assert_close(r.output[i:i + 1], h)


@dataclass
class MyResult:
    """A user's own result type, implementing DynamicResult."""

    scores: torch.Tensor
    penalty: torch.Tensor

    @property
    def output(self):
        return self.scores

    @property
    def aux_loss(self):
        return self.penalty

    def task_loss(self, target, loss_fn, per_sample=None):
        return loss_fn(self.scores, target)

    def statistics(self):
        return {"steps": torch.full((self.scores.shape[0],), 2)}


class MyNet(nn.Module):
    def __init__(self, penalty: float):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 3)
        self.penalty = penalty

    def forward(self, x):
        z = self.linear(x)
        return MyResult(z, self.penalty * z.square().mean())


def test_fit_reads_a_users_dynamic_result_through_the_protocol(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    config = {"epochs": 2, "batch_size": 8, "loss": "cross_entropy",
              "metrics": ["loss", "accuracy", "steps"]}
    nets = {p: MyNet(p) for p in (0.0, 10.0)}
    assert isinstance(nets[0.0](x), adaptnet.dynamic.DynamicResult)
    for p, net in nets.items():
        res = adaptnet.fit(net, (x, y), config={**config, "run_dir": str(tmp_path / str(p))})
        assert res.history[-1]["train/steps"] == 2.0  # read from statistics()
    # aux_loss was added to the loss: a large penalty shrinks the outputs' weights.
    assert nets[10.0].linear.weight.norm() < nets[0.0].linear.weight.norm()


def test_a_result_outside_the_protocol_is_a_config_error(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x):
            return {"logits": self.linear(x)}

    with pytest.raises(ConfigError, match="must return a tensor or a DynamicResult"):
        adaptnet.fit(Odd(), (torch.randn(8, 5), torch.zeros(8).long()),
                     config={"epochs": 1, "loss": "cross_entropy", "run_dir": str(tmp_path)})


def test_a_result_of_the_old_protocol_is_told_the_new_name(tmp_path):
    @dataclass
    class Old:  # adaptnet 0.1's protocol: `prediction`
        prediction: torch.Tensor
        aux_loss: None = None

        def task_loss(self, target, loss_fn, per_sample=None):
            return loss_fn(self.prediction, target)

        def statistics(self):
            return {}

    class Net(nn.Linear):
        def forward(self, x):
            return Old(super().forward(x))

    with pytest.raises(ConfigError, match="called `output` `prediction`: rename it"):
        adaptnet.fit(Net(5, 3), (torch.randn(8, 5), torch.zeros(8).long()),
                     config={"epochs": 1, "loss": "cross_entropy", "run_dir": str(tmp_path)})


def test_shipped_results_implement_the_protocol():
    ee = adaptnet.EarlyExit([nn.Linear(4, 4)] * 2, [nn.Linear(4, 2)] * 2)
    depth = adaptnet.AdaptiveDepth(nn.Linear(4, 4), adaptnet.dynamic.ACTHalting(nn.Linear(4, 1)), 3)
    moe = adaptnet.MoE([nn.Linear(4, 4)] * 2, nn.Linear(4, 2), k=1)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    for r in (ee(x), ee.eval()(x), depth(x), moe(x)):
        assert isinstance(r, adaptnet.dynamic.DynamicResult)
        assert r.output.shape[0] == 6 and r.statistics()
    train = ee.train()(x)
    torch.testing.assert_close(train.task_loss(y, F.cross_entropy), train.joint_loss(y))


@pytest.mark.parametrize("shape,bins,dims", [((3, 5, 20), 4, 1), ((3, 5, 20), 20, 1),
                                             ((3, 5, 14), 4, 1), ((2, 3, 12, 8), 4, 2),
                                             ((2, 3, 14, 14), 4, 2)])
def test_mean_pool_equals_adaptive_average_pooling(shape, bins, dims):
    h = torch.randn(*shape, requires_grad=True)
    ref = (F.adaptive_avg_pool1d if dims == 1 else F.adaptive_avg_pool2d)(h, bins)
    got = MeanPool(bins, dims)(h)
    torch.testing.assert_close(got, ref)
    g, g_ref = torch.autograd.grad(got.sum(), h), torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(g[0], g_ref[0])
