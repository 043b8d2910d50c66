"""summary(): unique vs per-use accounting, exact where torchinfo double-counts."""

from __future__ import annotations

import torch
import torchinfo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaptnet
from conftest import TinyLM, tied_ae, tied_lm


def test_tied_lm_counts_16272_where_torchinfo_reports_32272():
    model = tied_lm()
    s = adaptnet.summary(model)
    assert (s.unique, s.per_use, s.trainable, s.frozen) == (16_272, 32_272, 16_272, 0)
    assert s.bytes == 16_272 * 4
    assert round(s.saving_ratio, 3) == round(32_272 / 16_272, 3)
    info = torchinfo.summary(model, input_data=torch.zeros(2, 3, dtype=torch.long), verbose=0)
    assert info.total_params == 32_272  # torchinfo 1.8 counts the tied tensor twice
    untied = adaptnet.summary(TinyLM())
    assert untied.unique == untied.per_use == 32_272


def test_rows_and_rendering():
    s = adaptnet.summary(tied_ae())
    rows = {r.name: r for r in s.rows}
    assert rows["decoder"].type == "Linear"
    assert rows["decoder"].per_use == 60 + 12 and rows["decoder"].unique == 12
    assert rows["decoder"].shared == ("weight = encoder.weightᵀ",)
    assert sum(r.unique for r in s.rows) == s.unique
    text = str(s)
    assert "encoder.weightᵀ" in text and "unique 77 · per use 137" in " ".join(text.split())
    assert "1 shared group(s), 1 declared" in " ".join(text.split())  # the caption may wrap
    assert s.to_dict()["saving_ratio"] == s.saving_ratio


def test_frozen_is_deduplicated():
    model = tied_lm()
    model.embed.weight.requires_grad_(False)
    s = adaptnet.summary(model)
    assert (s.trainable, s.frozen) == (272, 16_000)


def test_meta_models_are_counted_without_memory():
    with torch.device("meta"):
        model = tied_lm()
    s = adaptnet.summary(model)
    assert (s.unique, s.bytes) == (16_272, 16_272 * 4)


@st.composite
def sharing_patterns(draw):
    """A ModuleList of Linear(3,3) with random module shares, param ties and freezing."""
    n = draw(st.integers(1, 6))
    layers = [nn.Linear(3, 3, bias=draw(st.booleans())) for _ in range(n)]
    for i in range(1, n):  # plain module aliasing
        if draw(st.booleans()):
            layers[i] = layers[draw(st.integers(0, i - 1))]
    model = nn.ModuleList(layers)
    names = [f"{i}.weight" for i in range(n)]
    for _ in range(draw(st.integers(0, 4))):  # declared parameter ties
        a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        if a != b:
            adaptnet.tie(model, a, b)
    for p in model.parameters():
        if draw(st.booleans()):
            p.requires_grad_(False)
    return model


@settings(max_examples=60, deadline=None)
@given(sharing_patterns())
def test_counts_equal_an_independent_count_over_unique_storages(model):
    storages = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        storages[p.untyped_storage().data_ptr()] = p
    s = adaptnet.summary(model)
    assert s.unique == sum(p.numel() for p in storages.values())
    assert s.trainable == sum(p.numel() for p in storages.values() if p.requires_grad)
    assert s.frozen == s.unique - s.trainable
    assert s.per_use == sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert sum(g.numel * len(g.members) for g in s.groups) == s.per_use - s.unique
