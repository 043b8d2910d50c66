"""share(): cross-layer sharing with the strategies of Takase & Kiyono (2021)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptnet
from adaptnet.errors import ShareError


def stack(n: int = 6, dim: int = 4) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))
    model.other = nn.Linear(dim, dim)
    return model


def block_ids(model: nn.Module) -> list[int]:
    """Which distinct module each layer is, numbered in order of first appearance."""
    ids: dict[int, int] = {}
    return [ids.setdefault(id(layer), len(ids)) for layer in model.layers]


@pytest.mark.parametrize(
    ("strategy", "blocks", "n", "expected"),
    [
        ("all", 1, 6, [0, 0, 0, 0, 0, 0]),
        ("sequence", 3, 6, [0, 0, 1, 1, 2, 2]),
        ("cycle", 3, 6, [0, 1, 2, 0, 1, 2]),
        ("cycle_rev", 3, 6, [0, 1, 2, 2, 1, 0]),
        ("sequence", 2, 5, [0, 0, 0, 1, 1]),
        ("cycle", 2, 5, [0, 1, 0, 1, 0]),
        ("cycle_rev", 3, 7, [0, 1, 2, 0, 2, 1, 0]),
        ("cycle", 6, 6, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_strategies_assign_blocks(strategy, blocks, n, expected):
    model = stack(n)
    owners = adaptnet.share(model, "layers", blocks=blocks, strategy=strategy)
    assert block_ids(model) == expected
    assert owners == [f"layers.{expected.index(b)}" for b in expected]
    s = adaptnet.summary(model)
    assert s.unique == (blocks + 1) * 20 and s.per_use == (n + 1) * 20


def test_share_with_external_owner_and_path_list():
    model = stack(3)
    adaptnet.share(model, ["layers.0", "layers.2"], owner="other")
    assert model.layers[0] is model.other and model.layers[2] is model.other
    assert model.layers[1] is not model.other


def test_shared_layer_accumulates_gradients_from_every_use():
    model = stack(3)
    adaptnet.share(model, "layers")
    x = torch.randn(5, 4)
    h = x
    for layer in model.layers:
        h = torch.tanh(layer(h))
    h.sum().backward()
    W, b = (model.layers[0].weight.detach().clone().requires_grad_(),
            model.layers[0].bias.detach().clone().requires_grad_())
    r = x
    for _ in range(3):
        r = torch.tanh(r @ W.T + b)
    r.sum().backward()
    torch.testing.assert_close(model.layers[0].weight.grad, W.grad)
    torch.testing.assert_close(model.layers[2].bias.grad, b.grad)


def test_sharing_survives_save_load_into_unshared_model(tmp_path):
    model = stack(4)
    adaptnet.share(model, "layers", blocks=2, strategy="cycle")
    adaptnet.save(model, tmp_path / "m.safetensors")
    fresh = adaptnet.load(stack(4), tmp_path / "m.safetensors")
    assert block_ids(fresh) == [0, 1, 0, 1]
    assert torch.equal(fresh.layers[3].weight, model.layers[1].weight)
    adaptnet.assert_tied(fresh)


def test_share_records_modules_and_assert_tied_checks_them():
    model = stack(3)
    adaptnet.share(model, "layers")
    model.layers[2] = nn.Linear(4, 4)  # someone replaced a shared layer
    with pytest.raises(adaptnet.errors.TieBrokenError,
                       match=r"module 'layers\.2' is not 'layers\.0'"):
        adaptnet.assert_tied(model)
    assert adaptnet.retie(model) == ["layers.2"]
    assert model.layers[2] is model.layers[0]


def test_untie_module_gives_it_its_own_copy():
    model = stack(3)
    adaptnet.share(model, "layers")
    assert adaptnet.untie(model, "layers.1") == ["layers.1"]
    assert model.layers[1] is not model.layers[0] and model.layers[2] is model.layers[0]
    assert torch.equal(model.layers[1].weight, model.layers[0].weight)
    adaptnet.assert_tied(model)
    with pytest.raises(adaptnet.errors.TieError, match="untie the module instead"):
        adaptnet.untie(model, "layers.2.weight")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modules": "layerz"}, r"'layerz' is not a submodule of Module\. Did you mean 'layers'"),
        ({"modules": ["layers.0", "layers.9"]}, r"not submodules of Module: 'layers.9'"),
        ({"modules": "layers", "blocks": 0}, r"blocks=0 must be an integer from 1 to .* \(3\)"),
        ({"modules": "layers", "blocks": 4, "strategy": "cycle"}, "from 1 to the number"),
        ({"modules": "layers", "blocks": 2}, "strategy 'all' uses one block"),
        ({"modules": "layers", "strategy": "zigzag"}, "unknown strategy 'zigzag'"),
        ({"modules": "layers", "owner": "other", "blocks": 2, "strategy": "cycle"},
         "it needs blocks=1"),
        ({"modules": ["layers.0"]}, "got one layer"),
    ],
)
def test_share_argument_errors(kwargs, match):
    with pytest.raises(ShareError, match=match):
        adaptnet.share(stack(3), **kwargs)


def test_share_reports_every_structural_difference_at_once():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 8), nn.Conv1d(4, 4, 1),
                                  nn.Linear(4, 4, bias=False)])
    with pytest.raises(ShareError) as info:
        adaptnet.share(model, "layers")
    msg = str(info.value)
    assert "layers.1.weight is [8, 4] torch.float32 but layers.0.weight is [4, 4]" in msg
    assert "'layers.2' is Conv1d but 'layers.0' is Linear" in msg
    assert "layers.3.bias is missing" in msg
    assert model.layers[1] is not model.layers[0]  # nothing was changed


def test_share_refuses_a_module_and_its_parent():
    model = nn.Module()
    model.outer = nn.Sequential(nn.Linear(4, 4))
    model.inner = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ShareError, match="one contains the other"):
        adaptnet.share(model, ["outer.0", "outer"], owner="outer")
