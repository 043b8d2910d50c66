"""The textbook sharing examples behave as the textbooks say, and adaptnet accounts for them."""

from __future__ import annotations

import torch
from torch import nn

import adaptnet


def test_one_linear_used_twice_in_a_sequential():
    # The classic example: the same layer object at positions 2 and 4.
    shared = nn.Linear(8, 8)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                        nn.Linear(8, 1))
    net(torch.randn(2, 4))
    net[2].weight.data[0, 0] = 100
    assert net[4].weight[0, 0] == 100  # one tensor, not a copy
    s = adaptnet.summary(net)
    assert s.unique == (4 * 8 + 8) + (8 * 8 + 8) + (8 + 1)
    assert s.per_use == s.unique + 8 * 8 + 8
    assert [g.names for g in s.groups] == [("2.weight", "4.weight"), ("2.bias", "4.bias")]
    assert [r.shared for r in s.rows if r.name == "4"] == [("weight = 2.weight",
                                                            "bias = 2.bias")]


class ScaledLinear(nn.Module):
    """Linear layer whose input is multiplied by a learnable scale vector."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d_in))
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) -> (B, d_out)
        return self.linear(x * self.scale)


def test_a_scale_vector_shared_by_two_layers_trains_as_one_tensor():
    net = nn.Sequential(ScaledLinear(8, 8), nn.Tanh(), ScaledLinear(8, 3))
    adaptnet.tie(net, "2.scale", "0.scale")
    with torch.no_grad():
        net[0].scale.uniform_(0.5, 1.5)
    x = torch.randn(5, 8)
    # Reference: one tensor s used by both layers, written by hand.
    s = net[0].scale.detach().clone().requires_grad_()
    ref = net[2].linear(torch.tanh(net[0].linear(x * s)) * s)
    ref.sum().backward()
    net(x).sum().backward()
    torch.testing.assert_close(net[0].scale.grad, s.grad)  # the sum over both uses
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    assert net[2].scale is net[0].scale
    torch.testing.assert_close(net[2].scale, (s - 0.1 * s.grad).detach())
    assert sum(p.numel() for p in net.parameters()) == adaptnet.summary(net).unique
    assert adaptnet.summary(net).per_use - adaptnet.summary(net).unique == 8
