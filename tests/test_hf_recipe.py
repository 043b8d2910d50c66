"""Recipes over Hugging Face models (model ``hf_causal_lm``): train, measure, compare, refuse."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
import transformers
from typer.testing import CliRunner

from adaptnet.cli import app
from adaptnet.recipes import load_run

runner = CliRunner()
QUICK = ["train.epochs=1", "--limit", "64"]


def saved_llama(tmp_path, vocab: int = 90):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


@pytest.mark.slow
def test_the_shipped_recipe_trains_and_reports_decoding_against_its_base(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "shakespeare-hf-mod", *QUICK, "--run-dir", str(run)],
                           env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "decode tokens/s" in said and "agreement with base" in said
    decode = json.loads((run / "results.json").read_text())["decode"]
    assert decode["tokens_per_s"] > 0 and decode["base_tokens_per_s"] > 0
    assert 0.0 <= decode["agreement"] <= 1.0
    assert 2.0 <= decode["layers_per_token"] <= 4.0  # layers 1 and 3 routed
    _, model, _ = load_run(run)  # the trained run loads back: the same adapted model
    assert type(model).__name__ == "AdaptedLM" and model.spec["kind"] == "mod"


@pytest.mark.slow
def test_a_local_model_directory_trains_only_what_adaptnet_adds(tmp_path):
    path, original = saved_llama(tmp_path)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "shakespeare-hf-mod", f"model.directory={path}",
                                 *NO_SIZES, "model.freeze_base=true",
                                 "model.adapt=exit", "model.rule=learned", *QUICK,
                                 "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    values = json.loads((run / "results.json").read_text())
    assert values["params"]["trainable"] == 3 * (32 + 1)  # three exit classifiers
    _, model, _ = load_run(run)
    for name, t in original.state_dict().items():  # the base did not move
        assert torch.equal(model.base.state_dict()[name], t), name


NO_SIZES = ["model.d_model=null", "model.layers=null", "model.heads=null", "model.kv_heads=null"]


@pytest.mark.parametrize("override, message", [
    (["model.directory=/no/such/dir", *NO_SIZES], "is not a directory"),
    ("model.directory=/no/such/dir", "brings its own sizes"),
    ("model.adapt=skip", "model.adapt must be one of"),
    ("model.model_type=bert_nope", "knows no such model type"),
    ("model.capacity=1.5", "capacity"),
    ("model.every=9", "layers"),
])
def test_bad_model_settings_exit_2_with_one_message(tmp_path, override, message):
    overrides = override if isinstance(override, list) else [override]
    result = runner.invoke(app, ["train", "shakespeare-hf-mod", *overrides, *QUICK,
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_a_directory_with_pickled_weights_only_is_not_read(tmp_path):
    """Reading a model directory runs no code: pickled weights (pytorch_model.bin) are
    refused, safetensors only."""
    path, model = saved_llama(tmp_path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    result = runner.invoke(app, ["train", "shakespeare-hf-mod", f"model.directory={path}",
                                 *NO_SIZES, *QUICK,
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "safetensors" in result.output


@pytest.mark.slow
def test_compare_over_capacities_shows_decoding_columns(tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "shakespeare-hf-mod", "--vary",
                                 "model.capacity=1.0,0.25", *QUICK, "--out-dir", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())
    full, quarter = rows
    assert full["layers_per_token"] == 4.0 and full["agreement"] == 1.0
    assert quarter["layers_per_token"] < 4.0
    assert "decode tokens/s" in (out / "compare.md").read_text()


@pytest.mark.slow
def test_a_gpt2_run_keeps_its_head_tied_to_the_embedding_after_training_and_loading(tmp_path):
    """GPT-2 ties lm_head to wte: one tensor trained, saved, loaded back as one and
    stepped as one."""
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "shakespeare-hf-mod", "model.model_type=gpt2",
                                 "model.kv_heads=null", *QUICK, "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    _, model, _ = load_run(run)
    base = model.base
    assert base.lm_head.weight is base.transformer.wte.weight
    ids = torch.randint(0, base.config.vocab_size, (2, 5))
    before = base.lm_head.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(ids).output.square().mean().backward()
    opt.step()  # one tensor, one gradient (both uses summed), still one tensor
    assert base.lm_head.weight is base.transformer.wte.weight
    assert not torch.equal(base.lm_head.weight, before)
