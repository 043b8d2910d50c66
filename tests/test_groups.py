"""param_groups(): each trainable tensor once, with defined precedence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptnet
from adaptnet.errors import SelectionError
from conftest import tied_lm


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 8)


def groups_by_name(groups):
    return {n: {k: v for k, v in g.items() if k not in ("params", "param_names")}
            for g in groups for n in g["param_names"]}


def test_tied_tensor_appears_once_where_naive_groups_fail():
    model = tied_lm()
    naive = [{"params": [p for n, p in model.named_parameters(remove_duplicate=False)
                         if n.endswith("weight")]},
             {"params": [p for n, p in model.named_parameters(remove_duplicate=False)
                         if n.endswith("bias")]}]
    with pytest.warns(UserWarning, match="duplicate parameters"), \
            pytest.raises(ValueError, match="some parameters appear in more than one"):
        torch.optim.AdamW([*naive, {"params": [model.head.weight]}])
    groups = adaptnet.param_groups(model, weight_decay=0.1)
    torch.optim.AdamW(groups, lr=1e-3)  # no error
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 3


def test_default_no_decay_is_biases_and_norm_layers():
    got = groups_by_name(adaptnet.param_groups(Net(), weight_decay=0.1))
    assert got == {
        "backbone.0.weight": {"weight_decay": 0.1},
        "head.weight": {"weight_decay": 0.1},
        "backbone.0.bias": {"weight_decay": 0.0},
        "backbone.1.weight": {"weight_decay": 0.0},
        "backbone.1.bias": {"weight_decay": 0.0},
        "head.bias": {"weight_decay": 0.0},
    }


def test_rules_precedence_first_rule_then_no_decay():
    got = groups_by_name(adaptnet.param_groups(
        Net(), weight_decay=0.1, no_decay=["*.bias"],
        rules={"backbone.1.*": {"lr": 1e-5, "weight_decay": 0.5},  # sets decay: wins
               "backbone": {"lr": 1e-4},
               "backbone.0.weight": {"lr": 1.0}},  # shadowed by the rule above
    ))
    assert got["backbone.1.weight"] == {"lr": 1e-5, "weight_decay": 0.5}
    assert got["backbone.1.bias"] == {"lr": 1e-5, "weight_decay": 0.5}
    assert got["backbone.0.weight"] == {"lr": 1e-4, "weight_decay": 0.1}
    assert got["backbone.0.bias"] == {"lr": 1e-4, "weight_decay": 0.0}
    assert got["head.weight"] == {"weight_decay": 0.1}


def test_a_tied_tensor_matching_no_decay_through_any_name_is_not_decayed():
    model = tied_lm()
    got = groups_by_name(adaptnet.param_groups(model, weight_decay=0.1, no_decay=["head.*"]))
    assert got["embed.weight"] == {"weight_decay": 0.0}  # listed under its first name
    assert "head.weight" not in got


def test_frozen_tensors_are_left_out():
    model = Net()
    adaptnet.freeze(model, "backbone")
    names = [n for g in adaptnet.param_groups(model) for n in g["param_names"]]
    assert names == ["head.weight", "head.bias"]


def test_bad_rules_are_refused():
    with pytest.raises(SelectionError, match=r"rules=.*'neck.\*' match no parameter"):
        adaptnet.param_groups(Net(), rules={"neck.*": {"lr": 1.0}})
    with pytest.raises(SelectionError, match=r"rules\['head'\] must be a mapping"):
        adaptnet.param_groups(Net(), rules={"head": 0.1})
    with pytest.raises(SelectionError, match=r"no_decay=.*'nothing'"):
        adaptnet.param_groups(Net(), no_decay=["nothing"])
