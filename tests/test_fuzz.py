"""Fuzzed recipes and overrides: one message and exit 2, or success; never a traceback or a hang.

Bounded: a few dozen hypothesis examples on recipes whose data loads in well
under a second (issue 14, part 3); every shipped recipe's validation (no data
loads); and run directories whose files are mutated or replaced by garbage.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adaptnet.cli import app
from adaptnet.errors import RecipeError
from adaptnet.recipes import validate_recipe
from adaptnet.recipes._schema import RECIPES

pytestmark = pytest.mark.slow  # fuzzing: hundreds of mutated inputs

runner = CliRunner()
FAST = ["digits-moe", "digits-adaptive-depth", "digits-tied-autoencoder",
        "regression-branch", "parity-pondernet", "digits-siamese", "digits-adaptive-mlp"]
SHIPPED = {n: yaml.safe_load((RECIPES / f"{n}.yaml").read_text()) for n in FAST
           if (RECIPES / f"{n}.yaml").is_file()}

values = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["adam", "cross_entropy", "mse", "StepLR", "cuda", "normal(std=-1)",
                     "zeros", "mlp", "digits", "transpose", "pairs", "autoencode"]),
    st.lists(st.integers(-5, 5), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(-2, 9), max_size=3))
named = st.sampled_from(["seed", "description", "data", "model", "train", "init",
                                  "transfer", "data.name", "data.valid", "data.transform",
                                  "model.name", "model.hidden", "model.heads", "model.k",
                                  "model.experts", "model.max_steps", "model.time_penalty",
                                  "train.lr", "train.epochs", "train.batch_size",
                                  "train.optimizer", "train.scheduler", "train.scheduler_args",
                                  "train.loss", "train.metrics", "train.device", "init.bias",
                                  "train.checkpoint_every", "transfer.backbone"])
keys = st.one_of(named, named, named, st.text(min_size=1, max_size=10))
override_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


def mutate(raw: dict, changes: list[tuple[str, object, bool]]) -> dict:
    raw = copy.deepcopy(raw)
    for key, value, delete in changes:
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        if delete:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return raw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(SHIPPED)),
       changes=st.lists(st.tuples(keys, values, st.booleans()), min_size=1, max_size=3),
       overrides=st.lists(st.one_of(
           override_text,
           st.builds(lambda k, v: f"{k}={v}", named, st.one_of(override_text, values.map(str))),
           st.builds(lambda k, v: f"{k}={v}", named, values.map(str))), max_size=2))
def test_mutated_recipes_fail_with_one_message_or_succeed(tmp_path_factory, name, changes,
                                                          overrides):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(mutate(SHIPPED[name], changes)))
    start = time.monotonic()
    result = runner.invoke(app, ["summary", str(path), *overrides])
    assert time.monotonic() - start < 30, "a hang"
    assert result.exit_code in (0, 2), (result.exit_code, result.output, repr(result.exception))
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert "error" in result.output.lower()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(SHIPPED)),
       changes=st.lists(st.tuples(named, values, st.booleans()), min_size=1, max_size=2),
       overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", named, values.map(str)),
                          max_size=2))
def test_mutated_recipes_train_or_fail_with_one_message(tmp_path_factory, name, changes,
                                                        overrides):
    """The same, through training (one epoch on 16 samples) into a fresh run directory."""
    root = tmp_path_factory.mktemp("fuzz-train")
    (root / "recipe.yaml").write_text(yaml.safe_dump(mutate(SHIPPED[name], changes)))
    result = runner.invoke(app, ["train", str(root / "recipe.yaml"), *overrides,
                                 "train.epochs=1", "--limit", "16", "--run-dir",
                                 str(root / "run")])
    assert result.exit_code in (0, 2), (result.exit_code, result.output, repr(result.exception))
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- every shipped recipe

ALL = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(RECIPES.glob("*.yaml"))}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(ALL)),
       changes=st.lists(st.tuples(keys, values, st.booleans()), min_size=1, max_size=3))
def test_every_shipped_recipe_mutated_validates_or_lists_its_problems(name, changes):
    """Validation alone (no data loads, no code runs): a Recipe or one RecipeError."""
    try:
        validate_recipe(mutate(ALL[name], changes))
    except RecipeError as e:
        assert str(e).strip()


# ---------------------------------------------------------------- run directories as data

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pristine") / "run"
    result = runner.invoke(app, ["train", "digits-moe", "train.epochs=1", "--limit", "32",
                                 "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    return run


FILES = ["config.yaml", "results.json", "checkpoint.json"]
junk = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                 st.sampled_from([b"", b"[]", b"null", b"{", b"\xff\xfe", b"recipe: [1, 2"]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(FILES), garbage=st.one_of(st.none(), junk),
       changes=st.lists(st.tuples(st.one_of(st.sampled_from(
           ["recipe", "limit", "extended", "model", "model.name", "model.num_experts", "data",
            "data.name", "train.epochs", "step", "sha256", "sha256.state.pt", "format",
            "weights_sha256", "test", "epochs"]), keys), values, st.booleans()),
           min_size=1, max_size=3))
def test_a_damaged_run_directory_is_read_with_one_message_or_works(finished_run, tmp_path_factory,
                                                                   which, garbage, changes):
    """config.yaml, results.json or a checkpoint's checkpoint.json mutated or replaced by
    garbage: eval, summary and a resume each exit 0 or 2 with one message."""
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(finished_run, run)
    target = next((run / "checkpoints").iterdir()) / which if which == "checkpoint.json" \
        else run / which
    if garbage is not None:
        target.write_bytes(garbage)
    else:
        text = target.read_text()
        raw = yaml.safe_load(text) if which.endswith(".yaml") else json.loads(text)
        changed = mutate(raw, changes)
        target.write_text(yaml.safe_dump(changed) if which.endswith(".yaml")
                          else json.dumps(changed, default=str))
    for command in (["eval", str(run)], ["summary", str(run)],
                    ["train", "digits-moe", "train.epochs=1", "--limit", "32", "--run-dir",
                     str(run), "--resume"]):
        result = runner.invoke(app, command)
        assert result.exit_code in (0, 2), (command, result.output, repr(result.exception))
        assert "Traceback" not in result.output
