"""Fuzzed recipes and overrides: one message and exit 2, or success; never a traceback or a hang.

Bounded: a few dozen hypothesis examples on recipes whose data loads in well
under a second (issue 14, part 3).
"""

from __future__ import annotations

import copy
import time

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adaptnet.cli import app
from adaptnet.recipes._schema import RECIPES

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
