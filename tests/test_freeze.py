"""freeze / unfreeze: tied tensors are one tensor, so collateral changes are reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptnet
from adaptnet.errors import SelectionError
from conftest import tied_ae, tied_lm


def test_freezing_one_owner_reports_the_other():
    model = tied_lm()
    report = adaptnet.freeze(model, "head")
    assert report.changed == ("head.weight",)
    assert report.collateral == ("embed.weight",)
    assert not model.embed.weight.requires_grad
    assert "also froze through ties: embed.weight" in str(report)


def test_untie_instead_freezes_only_the_match_and_training_leaves_it_bit_identical():
    model = tied_lm()
    report = adaptnet.freeze(model, "head.weight", untie=True)
    assert report.untied == ("head.weight",) and report.collateral == ()
    assert model.head.weight is not model.embed.weight
    assert model.embed.weight.requires_grad and not model.head.weight.requires_grad
    frozen, trainable = model.head.weight.detach().clone(), model.embed.weight.detach().clone()
    opt = torch.optim.AdamW(adaptnet.param_groups(model, weight_decay=0.1), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randint(0, 1000, (4, 3))).logsumexp(-1).mean().backward()
        opt.step()
    assert torch.equal(model.head.weight, frozen)
    assert not torch.equal(model.embed.weight, trainable)


def test_untie_a_transposed_member_before_freezing():
    model = tied_ae()
    report = adaptnet.freeze(model, "decoder.weight", untie=True)
    assert report.untied == ("decoder.weight",)
    assert not model.decoder.weight.requires_grad and model.encoder.weight.requires_grad
    assert torch.equal(model.decoder.weight, model.encoder.weight.T)


def test_matched_members_stay_tied_among_themselves():
    net = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    adaptnet.tie(net, "1.weight", "0.weight")
    adaptnet.tie(net, "2.weight", "0.weight")
    report = adaptnet.freeze(net, ["1.weight", "2.weight"], untie=True)
    assert report.untied == ("1.weight", "2.weight")
    assert net[1].weight is net[2].weight and net[1].weight is not net[0].weight
    assert not net[1].weight.requires_grad and net[0].weight.requires_grad


def test_unfreeze_is_symmetric_and_quiet_when_nothing_changes():
    model = tied_lm()
    adaptnet.freeze(model, "*")
    report = adaptnet.unfreeze(model, "embed")
    assert report.requires_grad and report.collateral == ("head.weight",)
    assert model.head.weight.requires_grad and not model.hidden.weight.requires_grad
    again = adaptnet.unfreeze(model, "embed")
    assert again.changed == ("embed.weight",) and again.collateral == ()


def test_patterns_that_match_nothing_are_refused_with_a_suggestion():
    with pytest.raises(SelectionError, match=r"'hed' match no parameter.*Did you mean"):
        adaptnet.freeze(tied_lm(), ["embed", "hed"])


def test_plain_module_reuse_unties_for_real_or_refuses_with_the_fix():
    """Seed 003's ``nn.Sequential(s, nn.ReLU(), s)``: one module object at two paths."""
    s = nn.Linear(3, 3)
    net = nn.Sequential(s, nn.ReLU(), s)
    with pytest.raises(adaptnet.errors.TieError,
                       match=r"'2.weight' belongs to module '2', which is "
                       r"the same module object as '0'.*adaptnet.untie\(model, '2'\)"):
        adaptnet.untie(net, "2.weight")
    assert net[0] is net[2]
    with pytest.raises(adaptnet.errors.TieError, match=r"adaptnet.untie\(model, '2'\)"):
        adaptnet.freeze(net, "2.weight", untie=True)  # half of the module: refused too
    report = adaptnet.freeze(net, "2", untie=True)
    assert report.untied == ("2.weight", "2.bias") and report.collateral == ()
    assert net[0] is not net[2] and torch.equal(net[0].weight, net[2].weight)
    assert net[0].weight.requires_grad and not net[2].weight.requires_grad
    t = nn.Linear(3, 3)
    other = nn.Sequential(t, nn.ReLU(), t)
    assert adaptnet.untie(other, "0") == ["0"] and other[0] is not other[2]
