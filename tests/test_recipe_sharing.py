"""Sharing as configuration for any model: ``ties:``/``share:`` recipe sections, a user's own
builder (``model.builder: "module:function"``), and ``--vary ties=on,off``."""

from __future__ import annotations

import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

import adaptnet
from adaptnet.cli import app
from adaptnet.errors import RecipeError
from adaptnet.recipes import (
    compare_variants,
    load_recipe,
    load_run,
    prepare,
    train_recipe,
    variants,
)

MODULE = '''
import torch.nn as nn

def autoencoder(in_features: int, hidden: int = 8):
    """A user's own autoencoder: plain PyTorch, no tie of its own."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, in_features))

def stack(in_features: int, num_classes: int, width: int = 16, depth: int = 4):
    layers = [nn.Linear(in_features, width)]
    body = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU())
                           for _ in range(depth)])
    return nn.Sequential(*layers, body, nn.Linear(width, num_classes))

def broken(in_features: int):
    raise RuntimeError("my builder is broken")

def not_a_module(in_features: int):
    return 3
'''

QUICK = ["train.epochs=1"]


@pytest.fixture
def user_code(user_module):
    """A module of the user's in the current directory, as a script would sit beside it."""
    return user_module("mymodels", MODULE)


def recipe_file(root, **sections) -> str:
    recipe = {"seed": 0, "data": {"name": "digits", "transform": "autoencode"},
              "model": {"builder": "mymodels:autoencoder", "hidden": 8},
              "train": {"optimizer": "adam", "lr": 0.005, "batch_size": 32, "epochs": 1},
              **sections}
    path = root / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


TIES = {"2.weight": {"owner": "0.weight", "transform": "transpose"}}


def test_a_user_builder_with_a_transposed_tie_trains_saves_and_reloads(user_code):
    name, recipe = load_recipe(recipe_file(user_code, ties=TIES))
    model = prepare(recipe, 8, trust_code=True)[1]
    assert type(model).__name__ == "Sequential"
    assert adaptnet.summary(model).unique == 64 * 8 + 8 + 64  # one matrix, two uses
    torch.testing.assert_close(model[2].weight, model[0].weight.mT)
    run = train_recipe(name, recipe, user_code / "run", limit=32, trust_code=True).run_dir
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["model"]["builder"] == "mymodels:autoencoder" and "name" not in stored["model"]
    assert stored["ties"] == TIES
    _, again, _ = load_run(run, trust_code=True)
    torch.testing.assert_close(again[2].weight, again[0].weight.mT)
    assert adaptnet.ties(again)  # the tie is back, not two copies


def test_vary_ties_on_off_compares_any_model(user_code):
    rows = compare_variants(recipe_file(user_code, ties=TIES), variants(["ties=on,off"]), QUICK,
                   user_code / "cmp", limit=32, trust_code=True)
    assert [r["variant"] for r in rows] == ["ties=true", "ties=false"]
    assert rows[0]["unique_params"] == 64 * 8 + 8 + 64
    assert rows[1]["unique_params"] == 2 * 64 * 8 + 8 + 64


def test_share_section_applies_strategies_to_a_user_model(user_code):
    share = {"modules": "1", "blocks": 2, "strategy": "cycle"}
    path = recipe_file(user_code, share=share,
                       model={"builder": "mymodels:stack", "width": 16, "depth": 4},
                       data={"name": "digits"})
    model = prepare(load_recipe(path)[1], 8, trust_code=True)[1]
    body = model[1]
    assert body[0] is body[2] and body[1] is body[3] and body[0] is not body[1]
    unique = 64 * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 10 + 10
    assert adaptnet.summary(model).unique == unique
    off = prepare(load_recipe(path, ["share=off"])[1], 8, trust_code=True)[1]
    assert adaptnet.summary(off).unique == unique + 2 * (16 * 16 + 16)


@pytest.mark.parametrize(("sections", "overrides", "message"), [
    ({"model": {"builder": "mymodels"}}, [], r"must look like 'package.module:function'"),
    ({"model": {"builder": "nomodule:f"}}, [], r"cannot import 'nomodule' "
                                               r"\(ModuleNotFoundError"),
    ({"model": {"builder": "mymodels:nothing"}}, [], r"mymodels has no 'nothing'; its "
                                                     r"callables: autoencoder, broken"),
    ({"model": {"builder": "mymodels:autoencoder", "hiden": 3}}, [],
     r"model.hiden: unknown argument \(did you mean 'hidden'\?\)"),
    ({"model": {"name": "mlp", "builder": "mymodels:autoencoder"}}, [],
     r"exactly one of name"),
    ({"ties": {"2.weight": "0.weigth"}}, [], r"ties.2.weight: .*0.weigth"),
    ({"ties": {"2.weight": "0.weight"}}, [], r"ties.2.weight: .*shape"),
    ({"share": {"modules": ["0", "2"], "strategy": "zigzag"}}, [], r"share.0.strategy"),
    ({"share": {"modules": ["0", "1"]}}, [], r"share\[0\]: "),
    ({}, ["ties=on"], r"override ties=on: the recipe has no ties: section"),
    ({"model": {"builder": "mymodels:broken"}}, [],
     r"raised RuntimeError: my builder is broken"),
    ({"model": {"builder": "mymodels:not_a_module"}}, [], r"returned a int; it must return"),
])
def test_bad_builders_ties_and_shares_are_recipe_errors(user_code, sections, overrides,
                                                        message):
    with pytest.raises(RecipeError, match=message):
        _, recipe = load_recipe(recipe_file(user_code, **sections), overrides)
        prepare(recipe, 8, trust_code=True)


def test_cli_names_the_user_module_it_imports_and_fails_in_one_message(user_code):
    runner = CliRunner()
    path = recipe_file(user_code, ties=TIES)
    result = runner.invoke(app, ["train", path, "--limit", "16", "--run-dir",
                                 str(user_code / "run"), "--trust-code"])
    assert result.exit_code == 0, result.output
    for command in (["eval", str(user_code / "run")], ["summary", str(user_code / "run")],
                    ["summary", path]):
        result = runner.invoke(app, [*command, "--trust-code"])
        assert result.exit_code == 0, result.output
        said = " ".join(result.output.split())
        assert "runs your code: mymodels (" in said and "mymodels.py)" in said
    result = runner.invoke(app, ["train", recipe_file(user_code, ties={"2.weight": "x"}),
                                 "--trust-code"])
    assert result.exit_code == 2 and "ties.2.weight" in result.output
    assert "Traceback" not in result.output


# -- adaptnet.compare from a script ------------------------------------------------------


class Net(torch.nn.Module):
    """A user's own LM-like autoencoder with an optional transposed tie."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(64, 8), torch.nn.Linear(8, 64)
        if tied:
            adaptnet.tie(self, "dec.weight", "enc.weight", transform="transpose")

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_compare_from_a_script_gives_the_table_and_the_plot(tmp_path):
    data = adaptnet.data.load_dataset("digits")
    x = data.train.tensors[0][:256]
    start = time.perf_counter()
    result = adaptnet.compare({"tied": lambda: Net(True), "untied": lambda: Net(False)},
                              ((x, x), (x[:64], x[:64])), out=tmp_path, loss="mse", epochs=2,
                              lr=0.05, title="tie or not")
    wall = time.perf_counter() - start
    tied, untied = result.rows
    assert tied["unique_params"] == 64 * 8 + 8 + 64 and untied["unique_params"] == 2 * 64 * 8 + 72
    assert tied["metric"] == "loss" and tied["macs"] == untied["macs"] == 2 * 64 * 8
    # the timings are in their units: both trainings took less than the whole call, and a
    # median inference pass over the 64 test samples (ms per 1,000) less than an eighth of
    # it (each model makes 15 timed passes, eight at least as long as the median)
    assert 0 < tied["train_seconds"] + untied["train_seconds"] < wall
    assert all(0 < r["infer_ms_per_1k"] * 64 / 1000 < wall * 1000 / 8 for r in result.rows)
    text = str(result)
    assert "tie or not" in text and "1,096" in text and "584" in text
    assert (tmp_path / "compare.png").stat().st_size > 5000
    assert "| tied |" in (tmp_path / "compare.md").read_text() and result.report.is_file()
    # a DataSplits works as it is, and the seed makes the run repeat
    again = adaptnet.compare({"tied": lambda: Net(True)}, ((x, x), (x[:64], x[:64])),
                             loss="mse", epochs=2, lr=0.05)
    assert again.rows[0]["value"] == tied["value"]


@pytest.mark.parametrize(("models", "data", "message"), [
    ({}, None, r"models must be a non-empty mapping"),
    ({"a": torch.nn.Linear(2, 2)}, None, r"models\['a'\] is a Linear; give a factory"),
    ({"a": lambda: 3}, "ok", r"models\['a'\]\(\) returned a int; it must return an nn.Module"),
    ({"a": lambda: torch.nn.Linear(2, 2)}, "bad", r"data must be a DataSplits"),
])
def test_compare_refuses_what_it_cannot_compare(models, data, message):
    x = torch.randn(8, 2)
    given = ((x, x), (x, x)) if data == "ok" else (x,) if data == "bad" else ((x, x), (x, x))
    with pytest.raises(adaptnet.errors.ConfigError, match=message):
        adaptnet.compare(models, given, loss="mse")
