"""Recipes and the ``adaptnet`` command: validation, overrides, run directories, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from typer.testing import CliRunner

import adaptnet
from adaptnet.cli import app
from adaptnet.data import FASHION_MNIST_DIR
from adaptnet.errors import RecipeError, RunDirError
from adaptnet.recipes import (
    compare_variants,
    evaluate_run,
    load_recipe,
    load_run,
    parse_overrides,
    prepare,
    shipped_recipes,
    train_recipe,
    validate_recipe,
    variants,
)
from adaptnet.recipes._compare import run_name

SHIPPED = sorted(shipped_recipes())
QUICK = ["train.epochs=1"]


def _needs_data(name: str):
    if "fashion" in name and not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (apt-get install "
                    "dataset-fashion-mnist)")


def test_every_shipped_recipe_validates_and_has_a_description():
    assert len(SHIPPED) >= 15
    for name in SHIPPED:
        assert shipped_recipes()[name], name
        load_recipe(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_runs_a_few_steps(name, tmp_path):
    _needs_data(name)
    recipe_name, recipe = load_recipe(name, QUICK)
    result = train_recipe(recipe_name, recipe, tmp_path / "run", limit=24)
    run = result.run_dir
    for f in ("config.yaml", "metrics.jsonl", "model.safetensors", "results.json",
              "summary.json", "report.md", "plots/curves.png", "plots/params.png"):
        assert (run / f).is_file(), f
    assert list((run / "tensorboard").iterdir()) and list((run / "checkpoints").iterdir())
    values = json.loads((run / "results.json").read_text())
    assert values["params"]["unique"] == adaptnet.summary(prepare(recipe, 1)[1]).unique
    assert values["epochs"] == 1 and torch.isfinite(torch.tensor(values["test"]["loss"]))


def test_run_dir_evaluates_to_the_same_numbers_and_is_not_overwritten(tmp_path):
    name, recipe = load_recipe("digits-moe", QUICK)
    res = train_recipe(name, recipe, tmp_path / "run", limit=64)
    again = evaluate_run(tmp_path / "run")
    assert again["accuracy"] == res.results.test["accuracy"]
    data, model, loaded = load_run(tmp_path / "run")  # the trained weights, the same recipe
    assert (loaded.model.name, loaded.train) == (recipe.model.name, recipe.train)
    assert data.sizes() == prepare(recipe, 64)[0].sizes()
    saved = safetensors.torch.load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert again["loss"] == pytest.approx(res.results.test["loss"], rel=1e-6)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run; continue it with --resume"):
        train_recipe(name, recipe, tmp_path / "run", limit=64)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model"]["in_features"] == 64 and config["model"]["num_classes"] == 10
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Parameters by module" in report and "plots/params.png" in report


def test_report_shows_exit_histogram(tmp_path):
    name, recipe = load_recipe("mnist1d-early-exit", [*QUICK, "model.threshold=0.2"])
    train_recipe(name, recipe, tmp_path / "run", limit=64)
    counts = json.loads((tmp_path / "run" / "results.json").read_text())["counts"]
    assert sum(counts["exit_index"]) == 64 and counts["exit_index"][0] > 0
    assert (tmp_path / "run" / "plots" / "exit_index.png").stat().st_size > 5000
    assert "Exit taken per sample" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_a_decoder_report_counts_the_blocks_each_token_ran(tmp_path):
    """Token models: whole counts per token (a per-sample mean is not a count)."""
    name, recipe = load_recipe("shakespeare-mod", [*QUICK, "data.seq_len=16"])
    train_recipe(name, recipe, tmp_path / "run", limit=32)
    values = json.loads((tmp_path / "run" / "results.json").read_text())
    depth = values["counts"]["depth"]  # depth[n]: test tokens that ran n blocks
    assert "steps" not in values["counts"] and sum(depth) == 32 * 16
    assert depth[2] > 0 and depth[4] > 0 and sum(depth[:2]) == 0  # 2 plain blocks, 2 routed
    assert "Blocks run per token" in (tmp_path / "run" / "report.md").read_text()


def test_bad_recipe_lists_every_problem_with_its_path():
    raw = {"data": {"name": "digits", "vaild": 0.1}, "model": {"name": "mlp", "hidden": "big"},
           "train": {"lr": -1, "optimiser": "adam"}, "extra": 1, "init": {"bias": "zeroes"}}
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw)
    msg = str(e.value)  # an unknown top-level key does not hide the other problems
    for part in ("extra: unknown key", "data.vaild: unknown argument (did you mean 'valid'?)",
                 "model.hidden: Input should be a valid integer", "train.lr: the learning rate",
                 "train.optimiser: unknown key (did you mean 'optimizer'?)",
                 "init.bias: initialize(): unknown scheme 'zeroes'"):
        assert part in msg, part
    assert msg.startswith("bad recipe (6 problems)")


def test_impossible_combinations_and_unknown_names():
    with pytest.raises(RecipeError, match=r"model.name: unknown model 'mpl' .did you mean 'mlp'"):
        validate_recipe({"data": {"name": "digits"}, "model": {"name": "mpl"}})
    with pytest.raises(RecipeError, match=r"data.name: unknown dataset 'digit'"):
        validate_recipe({"data": {"name": "digit"}, "model": {"name": "mlp"}})
    with pytest.raises(RecipeError, match=r"train.loss: 'mse' does not fit 'digits'"):
        validate_recipe({"data": {"name": "digits"}, "model": {"name": "mlp"},
                         "train": {"loss": "mse"}})
    with pytest.raises(RecipeError, match=r"train.run_dir: set by the command line"):
        validate_recipe({"data": {"name": "digits"}, "model": {"name": "mlp"},
                         "train": {"run_dir": "x"}})
    _, recipe = load_recipe("shakespeare-lstm", ["model.embed_size=64", "data.max_tokens=2000"])
    with pytest.raises(RecipeError, match="tied=True needs embed_size == hidden"):
        prepare(recipe)  # only the builder can see this one


def test_overrides():
    assert parse_overrides(["a.b=0.1", "c=true", "d=[1, 2]", "e=text", "f=null"]) == \
        {"a.b": 0.1, "c": True, "d": [1, 2], "e": "text", "f": None}
    with pytest.raises(RecipeError, match="must look like key=value"):
        parse_overrides(["train.lr"])
    _, recipe = load_recipe("mnist1d-cnn", ["train.lr=0.5", "model.channels=8", "seed=3"])
    assert recipe.train["lr"] == 0.5 and recipe.args("model")["channels"] == 8
    assert recipe.seed == 3
    with pytest.raises(RecipeError, match=r"model.chanels: unknown argument"):
        load_recipe("mnist1d-cnn", ["model.chanels=8"])
    assert variants(["model.tied=true,false", "train.lr=0.1,0.2"]) == {
        "tied=true,lr=0.1": {"model.tied": True, "train.lr": 0.1},
        "tied=true,lr=0.2": {"model.tied": True, "train.lr": 0.2},
        "tied=false,lr=0.1": {"model.tied": False, "train.lr": 0.1},
        "tied=false,lr=0.2": {"model.tied": False, "train.lr": 0.2}}


def test_unknown_recipe_and_not_a_run_dir(tmp_path):
    with pytest.raises(RecipeError, match=r"no shipped recipe of that name \(did you mean "
                       r"'mnist1d-cnn'\?\); shipped: "):
        load_recipe("mnist1d-cnnn")
    with pytest.raises(RecipeError, match="no shipped recipe of that name; shipped: "):
        load_recipe("zzz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match=r"not an adaptnet run directory.*notes.txt"):
        evaluate_run(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"recipe": "digits-moe", "data": {"name": "digits"}, "model": {"name": "moe_mlp"}}))
    with pytest.raises(RunDirError, match=r"no model.safetensors.*adaptnet train digits-moe "):
        evaluate_run(tmp_path)


def test_compare_trains_every_variant(tmp_path):
    rows = compare_variants("digits-tied-autoencoder", variants(["model.hidden=8,16"]), QUICK,
                   tmp_path, limit=32)
    assert [r["variant"] for r in rows] == ["hidden=8", "hidden=16"]
    assert rows[0]["unique_params"] == 64 * 8 + 8 + 64
    assert rows[1]["unique_params"] == 64 * 16 + 16 + 64
    assert json.loads((tmp_path / "compare.json").read_text()) == rows


# -- the command line ------------------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize("command", ["", "train", "eval", "summary", "compare", "recipes",
                                     "models", "demo"])
def test_help_everywhere(command):
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_train_eval_summary(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "digits-moe", "train.epochs=1", "--limit", "32",
                                 "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert f"report: {run / 'report.md'}" in result.output.replace("\n", "")
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0 and "accuracy" in result.output
    result = runner.invoke(app, ["summary", str(run)])
    assert result.exit_code == 0 and "body.experts.0.0" in result.output
    result = runner.invoke(app, ["summary", "shakespeare-lstm", "data.max_tokens=3000"])
    assert result.exit_code == 0 and "1 shared group(s), 1 declared" in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "mnist1d-cnn", "model.chanels=3"], "model.chanels: unknown argument"),
    (["train", "nope"], "no shipped recipe of that name"),
    (["eval", "."], "is not an adaptnet run directory"),
    (["train", "mnist1d-cnn", "lr"], "must look like key=value"),
    (["train", "fashion-small-cnn", "data.data_dir=/nonexistent"],
     "apt-get install dataset-fashion-mnist"),
    (["compare", "mnist1d-cnn", "--vary", "model.channels"], "must look like key=v1,v2"),
])
def test_cli_errors_are_one_message_with_exit_code_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_cli_recipes_models_compare_demo(tmp_path):
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "mnist1d-early-exit" in result.output
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "albert_encoder" in result.output
    result = runner.invoke(app, ["compare", "digits-tied-autoencoder", "--vary",
                                 "model.hidden=4,8", "train.epochs=1", "--limit", "16",
                                 "--out-dir", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000
    assert "hidden=4" in (tmp_path / "cmp" / "compare.md").read_text()
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir()) == [
        "0-hidden=4", "1-hidden=8"]
    result = runner.invoke(app, ["demo", "--limit", "64", "--out-dir", str(tmp_path / "demo")],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "fewer multiply-adds" in said and "calibrated on the validation" in said
    # The table fits an 80-column terminal whole: no line longer, no cell cut short.
    assert max(map(len, result.output.splitlines())) <= 80 and "…" not in result.output
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())
    plain, fast = demo["rows"]
    assert plain["params"] < fast["params"]  # the exits' heads
    assert set(plain["ms_per_1k"]) == {"1", "2"} and 0 < demo["threshold"] <= 1
    assert len(json.loads((tmp_path / "demo" / "compare.json").read_text())) == 2
    # report.md holds the calibrated figures the demo printed, not the recipe threshold's
    report = (tmp_path / "demo" / "report.md").read_text()
    summary = [line for line in report.splitlines() if line.startswith(("early", "threshold"))]
    assert len(summary) == 2 and all(" ".join(line.split()) in said for line in summary)
    assert f"threshold {demo['threshold']:.3f}, calibrated" in report
    assert f"| early-exit CNN | {fast['params']:,} | {100 * fast['accuracy']:.1f}% |" in report


def test_shipped_recipe_files_are_package_data():
    root = Path(adaptnet.recipes.__file__).parent / "shipped"
    assert sorted(p.stem for p in root.glob("*.yaml")) == SHIPPED


def test_compare_names_each_variant_directory_by_its_label():
    labels = list(variants(["model.mode=frozen,full", "train.lr=0.1"]))
    assert [run_name(i, label) for i, label in enumerate(labels)] == [
        "0-mode=frozen,lr=0.1", "1-mode=full,lr=0.1"]
    assert run_name(2, 'dir="../a b/c"') == "2-dir=.._a_b_c"  # stays inside the compare dir
