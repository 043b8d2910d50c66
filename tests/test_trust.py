"""Recipes and run directories are data: reading one runs no code unless the user opts in.

Each attack here ran code on the previous release: a standard-library builder
(``os:system``), a run directory whose ``config.yaml`` names a module with
import-time side effects, a zoo recipe whose transfer backbone names one.
"""

from __future__ import annotations

import sys

import pytest
import yaml
from typer.testing import CliRunner

from adaptnet.cli import app
from adaptnet.errors import RecipeError
from adaptnet.recipes import evaluate_run, load_recipe, load_run, prepare, train_recipe

# Importing this module leaves a mark: the test can tell whether any code ran.
SIDE_EFFECT = '''
import pathlib
pathlib.Path("IMPORTED").write_text("the module ran")
print("IMPORTING evilmod")

import torch.nn as nn

def build(in_features=64, num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
'''


@pytest.fixture
def here(user_module):
    return user_module("evilmod", SIDE_EFFECT)


def write(path, recipe: dict) -> str:
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def digits(model: dict, **more) -> dict:
    return {"seed": 0, "data": {"name": "digits"}, "model": model,
            "train": {"epochs": 1, "batch_size": 32}, **more}


def test_a_standard_library_builder_never_runs(here):
    path = write(here / "evil.yaml", digits({"builder": "os:system", "command": "touch PWNED"}))
    runner = CliRunner()
    for extra in ([], ["--trust-code"]):
        result = runner.invoke(app, ["summary", path, *extra])
        assert result.exit_code == 2, result.output
        assert "is in Python's standard library ('os')" in " ".join(result.output.split())
        assert "Traceback" not in result.output
    assert not (here / "PWNED").exists()
    for callable_ in ("builtins:range", "subprocess:run"):
        with pytest.raises(RecipeError, match=r"standard library"):
            load_recipe(write(here / "b.yaml", digits({"builder": callable_})))


def test_a_recipe_that_names_code_is_refused_without_the_opt_in(here):
    path = write(here / "mine.yaml", digits({"builder": "evilmod:build"}))
    name, recipe = load_recipe(path)  # reading and validating import nothing
    assert not (here / "IMPORTED").exists()
    for call in (lambda: prepare(recipe, 8), lambda: train_recipe(name, recipe, here / "r")):
        with pytest.raises(RecipeError, match=r"it would import 'evilmod'\. Recipes and run "
                           r"directories are data.*pass --trust-code \(trust_code=True"):
            call()
    result = CliRunner().invoke(app, ["train", path, "--limit", "16"])
    assert result.exit_code == 2 and "--trust-code" in result.output
    assert not (here / "IMPORTED").exists() and not (here / "r").exists()


def test_a_run_directory_is_data_eval_summary_and_load_run_run_nothing(here):
    path = write(here / "mine.yaml", digits({"builder": "evilmod:build"}))
    runner = CliRunner()
    result = runner.invoke(app, ["train", path, "--limit", "32", "--run-dir",
                                 str(here / "run"), "--trust-code"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert said.index("model.builder runs your code: evilmod (") < said.index("IMPORTING")
    (here / "IMPORTED").unlink()
    sys.modules.pop("evilmod", None)
    for command in (["eval", str(here / "run")], ["summary", str(here / "run")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "would import 'evilmod'" in " ".join(result.output.split())
    with pytest.raises(RecipeError, match=r"would import 'evilmod'"):
        load_run(here / "run")
    with pytest.raises(RecipeError, match=r"would import 'evilmod'"):
        evaluate_run(here / "run")
    assert not (here / "IMPORTED").exists(), "a run directory ran its code"
    assert load_run(here / "run", trust_code=True)[1] is not None  # asked: it runs


def test_a_transfer_backbone_that_names_code_is_refused_and_named(here):
    write(here / "backbone.yaml", digits({"builder": "evilmod:build"}))
    top = write(here / "top.yaml", digits({"builder": "evilmod:build"},
                                          transfer={"backbone": "backbone.yaml"}))
    zoo = write(here / "zoo.yaml", digits({"name": "mlp"},
                                          transfer={"backbone": "backbone.yaml"}))
    runner = CliRunner()
    for path in (top, zoo):
        result = runner.invoke(app, ["summary", path])
        assert result.exit_code == 2 and "would import 'evilmod'" in result.output
    assert not (here / "IMPORTED").exists()
    result = runner.invoke(app, ["summary", zoo, "--trust-code"])
    assert "model.builder runs your code: evilmod (" in " ".join(result.output.split())


def test_a_callable_without_a_signature_is_a_typed_error(here):
    recipe = load_recipe(write(here / "z.yaml", digits({"builder": "torch:zeros"})))[1]
    with pytest.raises(RecipeError, match=r"model.builder 'torch:zeros' with \{\} raised "
                       r"TypeError: zeros\(\) missing"):
        prepare(recipe, 8, trust_code=True)
