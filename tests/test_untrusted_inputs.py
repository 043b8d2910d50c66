"""Recipes, data files and weight files that ended in a traceback on the previous release.

Each now gives one typed error naming what was given and the fix (the CLI: one
message, exit 2).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn
from typer.testing import CliRunner

import adaptnet
from adaptnet.cli import app
from adaptnet.errors import CheckpointCorruptError, DataError, RecipeError
from adaptnet.recipes import load_recipe, validate_recipe
from adaptnet.transfer import load_weights

runner = CliRunner()


# ---------------------------------------------------------------- 11. recipes

@pytest.mark.parametrize("scheme, says", [
    ("normal(std=" + "-" * 500 + "1)", "std= is not a number, string or bool"),
    ("-" * 5000 + "1", "cannot read scheme"),
    ("\udc80", "cannot read scheme"),
    ("normal(std=" + "(" * 300 + ")", "cannot read scheme"),
])
def test_an_unreadable_init_scheme_is_a_recipe_error(scheme, says):
    with pytest.raises(RecipeError, match=rf"init\.\*: initialize\(\): .*{says}"):
        load_recipe("mnist1d-mlp", {"init": {"*": scheme}})


def test_a_csv_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,b,label\n1,2,x\n3,4,\xff\xfe\n")
    with pytest.raises(DataError, match=r"d.csv is not UTF-8 text \(byte 0xff on line 3\); "
                       r"save it as UTF-8"):
        adaptnet.data.load_dataset(str(path))


@pytest.mark.parametrize(("recipe", "override"), [
    ("fashion-early-exit", "model.dims=1"),
    ("mnist1d-universal-transformer", "model.step_features=2"),
    ("digits-moe", "data.transform=pairs"),
    ("fashion-sdn-resnet", "model.in_channels=3"),
])
def test_a_model_that_does_not_fit_its_data_is_refused_before_training(recipe, override,
                                                                        tmp_path):
    if "fashion" in recipe and not adaptnet.data.FASHION_MNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    result = runner.invoke(app, ["train", recipe, override, "train.epochs=1", "--limit", "16",
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "does not fit" in text and "one forward pass raised" in text
    assert "Traceback" not in text
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_seed_zero_is_a_seed():
    assert load_recipe("mnist1d-gru", ["data.seed=0"])[1].args("data")["seed"] == 0
    with pytest.raises(RecipeError, match=r"data.seed: must be a seed, an int from 0 to "
                       r"2\*\*64 - 1, got -1"):
        load_recipe("mnist1d-gru", ["data.seed=-1"])


# ---------------------------------------------------------------- 12. every problem at once

def test_a_recipe_without_data_still_reports_its_other_problems():
    with pytest.raises(RecipeError) as e:
        validate_recipe({"model": {"name": "no_such_model", "hidden": -3}, "bogus_key": 1,
                         "train": {"lr": -1}})
    text = str(e.value)
    assert "(4 problems)" in text
    for problem in ("data: required", "bogus_key: unknown key",
                    "model.name: unknown model 'no_such_model'", "train.lr: the learning rate"):
        assert problem in text


# ---------------------------------------------------------------- 13. weight files

def saved(tmp_path, manifest: dict) -> str:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    path = str(tmp_path / "m.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                path, metadata={"adaptnet": json.dumps(manifest)})
    return path


@pytest.mark.parametrize(("manifest", "message"), [
    ({"version": True, "aliases": {}, "modules": {}}, r"version True is not a version number"),
    ({"version": -5, "aliases": {}, "modules": {}}, r"version -5 is not a version number"),
    ({"version": 1, "aliases": {"1.bias": ["0.bias", None, "x"]}, "modules": {}},
     r"alias '1.bias' is \['0.bias', None, 'x'\], not \[owner, transform\]"),
    ({"version": 1, "aliases": {"1.bias": ["0.bias", "transpose"]}, "modules": {}},
     r"ties \['1.bias'\] to the transpose of tensors with fewer than 2 dimensions"),
])
def test_a_malformed_tie_manifest_is_a_corrupt_checkpoint(tmp_path, manifest, message):
    with pytest.raises(CheckpointCorruptError, match=message):
        adaptnet.load(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), saved(tmp_path, manifest))


@pytest.mark.parametrize("how", ["meta", "sparse"])
def test_a_state_dict_without_dense_values_is_refused(tmp_path, how):
    model = nn.Sequential(nn.Linear(4, 4))
    state = {k: v.to("meta") if how == "meta" else v.to_sparse()
             for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointCorruptError, match=r"holds tensors without dense values: "
                       r"0.weight"):
        load_weights(model, tmp_path / "w.pt")


# ---------------------------------------------------------------- 17. sizes that cannot fit

def test_a_model_too_large_for_memory_is_refused_before_it_is_allocated(monkeypatch):
    import time

    from adaptnet.recipes import _prepare, prepare

    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"Storage size calculation overflowed"):
        prepare(load_recipe("mnist1d-mlp", ["model.hidden=2147483648"])[1], 8)
    monkeypatch.setattr(_prepare, "available_memory", lambda: 2**30)  # 1 GiB free
    with pytest.raises(RecipeError, match=r"model 'mlp' with \{'hidden': 20000\} has "
                       r"401,040,010 parameters \(1.5 GiB\), more than the 1.0 GiB "
                       r"of memory free on this machine"):
        prepare(load_recipe("mnist1d-mlp", ["model.hidden=20000"])[1], 8)
    assert time.perf_counter() - start < 10  # nothing was allocated
    monkeypatch.setattr(_prepare, "available_memory", lambda: 2**40)
    assert prepare(load_recipe("mnist1d-mlp", ["model.hidden=32"])[1], 8)[1] is not None
