"""Bad input gets one clear, typed message: the CLI exits 2 without a traceback (issue 14, part 3).

Each case here (but the recipe weight_decay=-1, kept as a guard) raised a traceback, an untyped
error, or nothing at all before.
"""

from __future__ import annotations

import resource
import time

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import adaptnet
from adaptnet.cli import app
from adaptnet.errors import AdaptnetError

runner = CliRunner()


def cli_error(args: list[str], *fragments: str) -> str:
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and "error" in text.lower()
    for f in fragments:
        assert f in text, (f, text)
    return text


def recipe_file(tmp_path, text: str | bytes, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


BASE = "data: {name: digits}\nmodel: {name: mlp}\ntrain: {epochs: 1}\n"


def test_yaml_alias_bomb_is_refused_quickly_and_without_memory_growth(tmp_path):
    levels = ["  l0: &l0 [x, x, x, x, x, x, x, x, x]"] + [
        f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = recipe_file(tmp_path, BASE + "bomb:\n" + "\n".join(levels) + "\n")  # 9**9 leaves
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    cli_error(["summary", path], "values (YAML aliases expanded)")
    assert time.monotonic() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


@pytest.mark.parametrize(("text", "fragment"), [
    (b"data: {name: digits}\nmodel: {name: \xff\xfe}\n", "is not UTF-8 text"),
    ("a: " + "[" * 3000 + "]" * 3000 + "\n" + BASE, "cannot be read"),
    ("seed: " + "9" * 5000 + "\n" + BASE, "cannot be read"),
    ("seed: 99999999999999999999999\n" + BASE, "seed: Input should be less than 4294967296"),
    (BASE.replace("epochs: 1", "epochs: 1, batch_size: 100000000000000000000"),
     "train.batch_size: Input should be less than or equal to 2147483648"),
    (BASE + "init: {weight: 'normal(std=-1)'}\n", "std is a standard deviation"),
    (BASE.replace("epochs: 1", "epochs: 1, device: cuda"), "device 'cuda' is not available"),
    (BASE.replace("epochs: 1", "epochs: 1, device: mps"), "device 'mps' is not available"),
    (BASE.replace("{name: mlp}", "{name: albert_encoder, heads: 0}"),
     "model.heads: must be a positive int"),
    (BASE.replace("{name: mlp}", "{name: cnn1d, channels: 0}"),
     "model.channels: must be a positive int"),
    (BASE.replace("{name: mlp}", "{name: adaptive_depth_mlp, time_penalty: .nan}"),
     "model.time_penalty: must be a finite number"),
    (BASE.replace("{name: mlp}", "{name: moe_mlp, balance_weight: .nan}"),
     "model.balance_weight: must be a finite number"),
    (BASE.replace("epochs: 1", "epochs: 1, weight_decay: -1"),
     "train.weight_decay: Input should be greater than or equal to 0"),
    (BASE + "trian: {}\n" + "init: {bias: zeroes}\n", "(2 problems)"),
])
def test_bad_recipe_files_are_one_message(tmp_path, text, fragment):
    cli_error(["summary", recipe_file(tmp_path, text)], fragment)


def test_every_problem_is_reported_in_one_pass(tmp_path):
    text = cli_error(["summary", recipe_file(tmp_path, BASE.replace("{name: mlp}", "{name: mlp, "
                      "hidden: -3}") + "trian: 1\n")], "(2 problems)", "trian: unknown key",
                     "model.hidden: must be a positive int")
    assert "did you mean 'train'" in text


def test_alias_bomb_in_an_override_is_refused(tmp_path):
    value = "[" + ",".join(["[" + ",".join(["1"] * 200) + "]"] * 200) + "]"
    cli_error(["summary", "mnist1d-mlp", f"train.metrics={value}"],
              "values (YAML aliases expanded)")


def test_checkpoint_every_works_from_a_recipe_with_run_dir(tmp_path):
    result = runner.invoke(app, ["train", "regression-branch", "train.epochs=1",
                                 "train.checkpoint_every=2", "--limit", "32", "--run-dir",
                                 str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))


@pytest.mark.parametrize(("args", "fragment"), [
    (["train", "regression-branch", "--limit", "-1"], "Invalid value for '--limit'"),
    (["train", "regression-branch", "--run-dir", ""], "is the current directory"),
    (["train", "regression-branch", "--run-dir", "."], "is the current directory"),
])
def test_bad_cli_options(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_error(args, fragment)
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_a_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    cli_error(["train", "regression-branch", "--limit", "8", "--run-dir", str(tmp_path / "f")],
              "is a file, not a directory")


def test_damaged_config_yaml_in_a_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: x\nmodel: [unclosed\n")
    for command in ("eval", "summary"):
        cli_error([command, str(run)], "config.yaml cannot be read", "damaged")
    (run / "config.yaml").write_text("recipe: x\nmodel: {name: nope}\n")
    cli_error(["eval", str(run)], "does not hold a valid recipe")


def test_self_referential_transfer_recipe(tmp_path):
    path = tmp_path / "self.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "digits"}, "model": {"name": "mlp"},
                                    "transfer": {"backbone": str(path)}}))
    cli_error(["train", str(path), "--limit", "8", "--run-dir", str(tmp_path / "run")],
              "is itself a transfer recipe")


def test_data_and_model_that_do_not_fit(tmp_path):
    cli_error(["train", "mnist1d-mlp", "model.num_classes=3", "train.epochs=1", "--limit", "64",
               "--run-dir", str(tmp_path / "run")], "the loss cannot compare",
              "num_classes covers every label")


def test_torn_last_line_in_metrics_jsonl_resumes(tmp_path):
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    adaptnet.fit(nn.Linear(3, 1), (x, y), epochs=2, batch_size=10, run_dir=tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "epo')  # killed mid-write
    result = adaptnet.fit(nn.Linear(3, 1), (x, y), epochs=3, batch_size=10, run_dir=tmp_path,
                          resume=True)
    assert result.resumed_from.name == "step-000000008"
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [yaml.safe_load(r)["epoch"] for r in rows] == [1, 2, 3]


# ----------------------------------------------------------------------------- the Python API


def _early_exit():
    return adaptnet.EarlyExit([nn.Linear(4, 4), nn.Linear(4, 4)],
                              [nn.Linear(4, 3), nn.Linear(4, 3)], threshold=[0.5]).eval()


def _depth():
    policy = adaptnet.dynamic.ThresholdHalting(nn.Linear(4, 1))
    return adaptnet.AdaptiveDepth(nn.Linear(4, 4), policy, max_steps=3)


XY = (torch.randn(8, 2), torch.randn(8, 1))
API = {
    "evaluate unknown loss": (lambda: adaptnet.evaluate(nn.Linear(2, 1), XY, loss="bogus"),
                              "unknown loss 'bogus'"),
    "evaluate unknown metric": (lambda: adaptnet.evaluate(nn.Linear(2, 1), XY,
                                                          metrics=("acc",)),
                                "unknown metric(s) 'acc'"),
    "switch on uint16": (lambda: adaptnet.switch(torch.tensor([0, 5], dtype=torch.uint16),
                                                 [lambda v: v, lambda v: v], torch.ones(2, 1)),
                         "index values must lie in [0, 2)"),
    "MoE on a 0-d input": (lambda: adaptnet.MoE([nn.Linear(2, 2)], nn.Linear(2, 1), k=1)(
        torch.tensor(1.0)), "expected tokens of shape (..., d_in)"),
    "tie(None, ...)": (lambda: adaptnet.tie(None, "a", "b"), "expected the model, an nn.Module"),
    "tie with a non-str path": (lambda: adaptnet.tie(nn.Linear(2, 2), 3, "weight"),
                                "member must be a dotted parameter path"),
    "summary(None)": (lambda: adaptnet.summary(None), "expected the model"),
    "fit(None)": (lambda: adaptnet.fit(None, XY), "model must be an nn.Module"),
    "CosineAnnealingLR T_max=0": (lambda: adaptnet.fit(
        nn.Linear(2, 1), XY, scheduler="CosineAnnealingLR", scheduler_args={"T_max": 0}),
        "CosineAnnealingLR({'T_max': 0}) failed: ZeroDivisionError"),
    "fit on cuda without one": (lambda: adaptnet.fit(nn.Linear(2, 1), XY, device="cuda"),
                                "device 'cuda' is not available here"),
    "param_groups weight_decay=-1": (lambda: adaptnet.param_groups(nn.Linear(2, 2),
                                                                   weight_decay=-1),
                                     "weight_decay must be a finite number >= 0"),
    "labels beyond the classes": (lambda: adaptnet.fit(nn.Linear(2, 3), (XY[0], torch.arange(8)),
                                                       loss="cross_entropy"),
                                  "the loss cannot compare the model's output (8, 3)"),
    "branch with a non-callable": (lambda: adaptnet.branch(torch.tensor([True]), 1, 2,
                                                           torch.ones(1, 1)),
                                   "then_fn and else_fn must be callables"),
    "EarlyExit on an unbatched example": (lambda: _early_exit()(torch.randn(4)),
                                          "expected a batch (B, features...), got shape [4]"),
    "EarlyExit on per-token heads": (lambda: _early_exit()(torch.randn(2, 5, 4)),
                                     "head 0 returned logits of shape [2, 5, 3]"),
    "AdaptiveDepth on an unbatched example": (lambda: _depth()(torch.randn(4)),
                                              "x.unsqueeze(0)"),
    "ACT time_penalty NaN": (lambda: adaptnet.dynamic.ACTHalting(nn.Linear(2, 1),
                                                         time_penalty=float("nan")),
                             "time_penalty must be finite"),
    "PonderNet beta NaN": (lambda: adaptnet.dynamic.PonderNetHalting(nn.Linear(2, 1),
                                                             beta=float("nan")),
                           "beta must be finite"),
    "MoE balance_weight NaN": (lambda: adaptnet.MoE([nn.Linear(2, 2)], nn.Linear(2, 1), k=1,
                                                    balance_weight=float("nan")),
                               "balance_weight must be finite"),
    "share with an int path list": (lambda: adaptnet.share(nn.Sequential(nn.Linear(2, 2)), 5),
                                    "expected a name or a list of names"),
    "untie with an int": (lambda: adaptnet.untie(nn.Linear(2, 2), 5),
                          "expected a name or a list of names"),
    "freeze with an int": (lambda: adaptnet.freeze(nn.Linear(2, 2), 5),
                           "expected a name or a list of names"),
    "initialize with a string": (lambda: adaptnet.initialize(nn.Linear(2, 2), "zeros"),
                                 "rules must be {selector: scheme}"),
    "initialize with a bad seed": (lambda: adaptnet.initialize(nn.Linear(2, 2), {}, seed="x"),
                                   "seed must be an int"),
    "save to None": (lambda: adaptnet.save(nn.Linear(2, 2), None), "path must be a file path"),
    "load from None": (lambda: adaptnet.load(nn.Linear(2, 2), None),
                       "expected a file path or a state dict"),
    "load a state dict of ints": (lambda: adaptnet.load(nn.Linear(2, 2), {"weight": 3}),
                                  "a state dict maps names (str) to tensors"),
    "fit with a non-callable loss_fn": (lambda: adaptnet.fit(nn.Linear(2, 1), XY, loss_fn=3),
                                        "loss_fn must be a function"),
    "count_macs batch_size str": (lambda: adaptnet.count_macs(batch_size="x").__enter__(),
                                  "batch_size must be the number of input rows"),
    "load_backbone(3)": (lambda: adaptnet.transfer.load_backbone(3),
                         "source must be a module or a torchvision name"),
}


@pytest.mark.parametrize("case", list(API))
def test_api_errors_are_typed_with_the_fix(case):
    call, fragment = API[case]
    with pytest.raises(AdaptnetError) as info:
        call()
    assert fragment in str(info.value), str(info.value)
