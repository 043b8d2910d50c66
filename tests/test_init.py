"""adaptnet.initialize: every scheme's statistics, once per unique tensor, conflicts, errors."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn

import adaptnet
from adaptnet.errors import InitError, SelectionError
from conftest import tied_ae, tied_lm

# scheme -> (shape, expected mean, expected std); std from the formula each scheme documents
STATS = {
    "uniform(a=-1, b=3)": ((300, 400), 1.0, 4 / math.sqrt(12)),
    "normal(mean=0.5, std=0.02)": ((300, 400), 0.5, 0.02),
    "constant(val=0.3)": ((30, 40), 0.3, 0.0),
    "zeros": ((30, 40), 0.0, 0.0),
    "ones": ((30, 40), 1.0, 0.0),
    "xavier_uniform(gain=2.0)": ((300, 400), 0.0, 2.0 * math.sqrt(2 / 700)),
    "xavier_normal": ((300, 400), 0.0, math.sqrt(2 / 700)),
    "kaiming_uniform(nonlinearity=relu)": ((300, 400), 0.0, math.sqrt(2) / math.sqrt(400)),
    "kaiming_normal(mode=fan_out, nonlinearity=tanh)": ((300, 400), 0.0, (5 / 3) / math.sqrt(300)),
    "orthogonal": ((300, 400), 0.0, math.sqrt(300 / (300 * 400))),
    "trunc_normal(std=1.0, a=-1.0, b=1.0)": ((300, 400), 0.0, 0.53956),  # truncated at ±1σ
    "eye": ((300, 400), 300 / 120000, math.sqrt(300 / 120000 * (1 - 300 / 120000))),
    "dirac": ((8, 8, 3, 3), 8 / 576, math.sqrt(8 / 576 * (1 - 8 / 576))),
    "sparse(sparsity=0.25, std=0.1)": ((400, 300), 0.0, 0.1 * math.sqrt(0.75)),
}


@pytest.mark.parametrize("spec", list(STATS))
def test_each_scheme_has_its_statistics(spec):
    shape, mean, std = STATS[spec]
    holder = nn.Module()
    holder.w = nn.Parameter(torch.empty(shape))
    [row] = adaptnet.initialize(holder, {"w": spec}, seed=0).rows
    assert row.scheme == str(adaptnet.init.parse_scheme(spec))
    values = holder.w.detach().double()
    assert abs(float(values.mean()) - mean) < 0.02 * max(std, 0.05), spec
    assert float(values.std()) == pytest.approx(std, rel=0.03, abs=1e-9), spec
    assert row.expected_std == pytest.approx(std, rel=1e-3, abs=1e-9), spec
    assert row.std == pytest.approx(float(values.std()))


def test_tied_tensor_is_initialised_once():
    model = tied_lm()
    report = adaptnet.initialize(model, {"weight": "normal(std=0.02)", "bias": "zeros"}, seed=3)
    tied = [r for r in report.rows if len(r.paths) > 1]
    assert [r.paths for r in tied] == [("embed.weight", "head.weight")]
    assert model.head.weight is model.embed.weight
    # Reproduce with one draw per unique tensor, in model order: equal only if drawn once.
    gen = torch.Generator().manual_seed(3)
    embed = torch.empty(1000, 16).normal_(0, 0.02, generator=gen)
    hidden = torch.empty(16, 16).normal_(0, 0.02, generator=gen)
    assert torch.equal(model.embed.weight, embed)
    assert torch.equal(model.hidden.weight, hidden)
    assert torch.equal(model.hidden.bias, torch.zeros(16))


def test_conflicting_rules_on_a_tie_are_refused_before_anything_changes():
    model = tied_lm()
    before = model.embed.weight.detach().clone()
    with pytest.raises(InitError, match=r"embed.weight and head.weight are one tied tensor, but "
                       r"rule 'embed.weight' gives it normal\(std=0.02\) and rule 'head.weight' "
                       r"gives it zeros. A tied tensor is initialised once: make the rules "
                       r"agree, e.g. put "
                       r"\{'head.weight': 'normal\(std=0.02\)'\} before rule 'head.weight'"):
        adaptnet.initialize(model, {"embed.weight": "normal(std=0.02)", "head.weight": "zeros"})
    assert torch.equal(model.embed.weight, before)
    # The same scheme from two rules is no conflict.
    adaptnet.initialize(model, {"embed.weight": "normal(std=0.02)",
                                "head.weight": "normal(std=0.02)"})


def test_transposed_tie_uses_the_owners_fans():
    model = tied_ae()  # decoder.weight = encoder.weight.T; encoder.weight is (5, 12)
    report = adaptnet.initialize(model, {"Linear.weight": "kaiming_uniform(nonlinearity=relu)"},
                                 seed=0)
    [row] = [r for r in report.rows if len(r.paths) > 1]
    assert row.paths == ("encoder.weight", "decoder.weight") and row.shape == (5, 12)
    assert row.expected_std == pytest.approx(math.sqrt(2) / math.sqrt(12))  # fan_in = 12
    bound = math.sqrt(3) * row.expected_std
    assert model.encoder.weight.abs().max() <= bound
    torch.testing.assert_close(model.decoder.weight, model.encoder.weight.t())


def test_seeded_reproducible_and_global_rng_untouched():
    a, b = tied_lm(), tied_lm()
    state = torch.get_rng_state()
    for m in (a, b):
        adaptnet.initialize(m, {"weight": "xavier_uniform", "bias": "uniform"}, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_selectors_types_names_paths_and_first_match_wins():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    report = adaptnet.initialize(net, [("2.weight", "zeros"), ("Linear.weight", "ones"),
                                       ("LayerNorm", "constant(val=0.5)"), ("bias", "zeros")])
    schemes = {r.paths[0]: r.scheme for r in report.rows}
    assert schemes == {"0.weight": "ones", "0.bias": "zeros", "1.weight": "constant(val=0.5)",
                       "1.bias": "constant(val=0.5)", "2.weight": "zeros", "2.bias": "zeros"}
    assert torch.equal(net[2].weight, torch.zeros(2, 4))
    unmatched = adaptnet.initialize(nn.Sequential(nn.Linear(2, 2)), {"weight": "zeros"})
    assert [r.scheme for r in unmatched.rows] == ["zeros", None]  # the bias kept its value
    assert "(kept)" in str(unmatched)


def test_rules_from_yaml():
    rules = yaml.safe_load("""
        - embed.weight: {name: normal, std: 0.02}
        - head.weight: normal(std=0.02)
        - Linear.weight: kaiming_uniform(nonlinearity=relu, mode=fan_in)
        - "*.bias": zeros
    """)
    model = tied_lm()
    pairs = [next(iter(r.items())) for r in rules]
    report = adaptnet.initialize(model, pairs, seed=0)
    by_path = {r.paths[0]: r.scheme for r in report.rows}
    assert by_path["embed.weight"] == "normal(std=0.02)"
    assert by_path["hidden.weight"] == "kaiming_uniform(nonlinearity='relu', mode='fan_in')"
    assert by_path["hidden.bias"] == "zeros"


@pytest.mark.parametrize(("rules", "error", "message"), [
    ({"weight": "kaiming_unform"}, InitError,
     r"unknown scheme 'kaiming_unform' in 'kaiming_unform'. Did you mean 'kaiming_uniform'"),
    ({"weight": "normal(sd=1)"}, InitError, r"normal takes mean, std, got sd in 'normal\(sd=1\)'"),
    ({"weight": "constant"}, InitError, r"constant needs val, e.g. 'constant\(val=0.1\)'"),
    ({"weight": "normal(1)"}, InitError, r"cannot read scheme 'normal\(1\)'; write a name with "
     r"keyword arguments"),
    ({"bias": "xavier_uniform"}, InitError, r"xavier_uniform needs a at least 2-D tensor, but "
     r"hidden.bias has shape \(16,\)"),
    ({"w": "eye"}, InitError, r"eye needs a 2-D tensor, but w has shape \(2, 3, 4\)"),
    ({"hiden.weight": "zeros"}, SelectionError, r"selector\(s\) 'hiden.weight' match no "
     r"parameter. Did you mean 'hidden.weight'"),
    ({"weight": 3}, InitError, r"rule 'weight': scheme must be a string like"),
])
def test_bad_rules(rules, error, message):
    model = tied_lm()
    if "w" in rules:
        model = nn.Module()
        model.w = nn.Parameter(torch.empty(2, 3, 4))
    with pytest.raises(error, match=message):
        adaptnet.initialize(model, rules)


@pytest.mark.parametrize(("scheme", "message"), [
    ("normal(std=-1)", r"std is a standard deviation and must be >= 0, got -1"),
    ("normal(std=1e999)", r"std must be finite, got inf"),
    ("uniform(a=1, b=0)", r"a must not exceed b, got a=1, b=0"),
    ("constant(val=1e999)", r"val must be finite"),
    ("kaiming_normal(nonlinearity=rellu)", r"unknown nonlinearity 'rellu'"),
    ("sparse(sparsity=1.5)", r"sparsity is a fraction in \[0, 1\]"),
])
def test_bad_arguments_are_refused_before_any_tensor_is_written(scheme, message):
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(InitError, match=message):
        adaptnet.initialize(net, {"bias": "zeros", "0.weight": "ones", "1.weight": scheme})
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_the_report_prints_at_the_terminal_width_with_names_and_numbers_whole(
        monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    report = adaptnet.initialize(tied_lm(), {"*.weight": "xavier_uniform(gain=1.4142)",
                                             "*.bias": "zeros"})
    lines = str(report).splitlines()
    assert lines[0].split() == ["tensor", "shape", "scheme", "mean", "std", "expected"]
    # tensor names are never cut (schemes fold): 66 columns at least
    assert max(map(len, lines)) <= max(columns, 66) and "…" not in "".join(lines)
    row = next(r for r in report.rows if len(r.paths) > 1)  # the tied pair, one row
    assert any(line.startswith(row.paths[0] + " ") for line in lines)
    numbers = f"{row.mean:.4f}", f"{row.std:.4f}", f"{row.expected_std:.4f}"
    assert any(all(n in line for n in numbers) for line in lines)
    assert (f"{row.paths[0]} (+1 tied)" in str(report)) == (columns >= 120)  # else wrapped
