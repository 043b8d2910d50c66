"""adaptnet.fit: the textbook runs, equals a hand-written loop, resumes bit for bit, guards NaNs."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adaptnet
from adaptnet.errors import ConfigError, NonFiniteError
from conftest import mlp, tied_lm
from conftest import regression_xy as data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "train_script.py"


@pytest.mark.slow
def test_textbook_example_runs_with_every_optimizer():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "textbook_train.py")],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    blocks = out.split("-- ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [
        "SGD", "Adam", "RMSprop", "SGD + weight_decay=0.01", "SGD + L1=0.001"]
    for block in blocks:
        losses = [float(line.split("train/loss ")[1]) for line in block.splitlines()[1:]]
        assert len(losses) == 10 and losses[-1] < losses[0], block  # every 10 of 100 epochs


def test_equals_a_hand_written_loop():
    x, y = data()
    engine, hand = mlp(), mlp()
    adaptnet.fit(engine, (x, y), optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True,
                 epochs=20, batch_size=100)
    opt = torch.optim.SGD(hand.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for epoch in range(20):  # one full batch per epoch, in the engine's sample order
        order = torch.randperm(100, generator=torch.Generator().manual_seed(epoch))
        opt.zero_grad()
        nn.functional.mse_loss(hand(x[order]), y[order]).backward()
        opt.step()
    for p, q in zip(engine.parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_weight_decay_and_l1_shrink_weights_and_ties_hold():
    x, y = data()
    plain, decayed, sparse = mlp(), mlp(), mlp()
    for model, opts in ((plain, {}), (decayed, {"weight_decay": 0.5}), (sparse, {"l1": 0.01})):
        adaptnet.fit(model, (x, y), lr=0.05, epochs=30, batch_size=25, **opts)
    norm = lambda m: m[0].weight.norm()  # noqa: E731
    assert norm(decayed) < 0.9 * norm(plain) and norm(sparse) < 0.9 * norm(plain)
    lm = tied_lm()
    tokens = torch.randint(0, 1000, (32, 5))
    adaptnet.fit(lm, (tokens, tokens), loss="cross_entropy", optimizer="adamw",
                 weight_decay=0.1, lr=1e-2, epochs=2, metrics=("loss", "perplexity"))
    assert lm.head.weight is lm.embed.weight  # one tensor, stepped once


def test_scheduler_with_warmup_steps_per_optimizer_step():
    x, y = data(40)
    result = adaptnet.fit(mlp(), (x, y), lr=0.1, warmup_steps=4, scheduler="StepLR",
                          scheduler_args={"step_size": 2, "gamma": 0.5}, epochs=8,
                          batch_size=40)
    lrs = [row["lr"] for row in result.history]
    assert lrs[:4] == pytest.approx([0.1 * (k + 2) / 5 for k in range(4)])  # linear warmup
    assert lrs[4:] == pytest.approx([0.1, 0.05, 0.05, 0.025])


def test_early_stopping_and_validation_metrics():
    x, y = data()
    result = adaptnet.fit(mlp(), (x, y), val=(x[:20], y[:20]), lr=10.0, epochs=50,
                          batch_size=100, early_stopping=2, nonfinite="skip")
    assert result.stopped_early and len(result.history) < 50
    assert "val/loss" in result.history[0]


def test_auxiliary_losses_and_dynamic_metrics():
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    depth = nn.Sequential(nn.Linear(8, 8))
    policy = adaptnet.dynamic.ACTHalting(nn.Linear(8, 1), time_penalty=1.0)
    act = adaptnet.AdaptiveDepth(depth, policy, max_steps=4)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.depth, self.head = act, nn.Linear(8, 3)

        def forward(self, v):
            r = self.depth(v)
            return dataclasses.replace(r, output=self.head(r.output))

    model = Classifier()
    before = act.halting.head.bias.detach().clone()
    result = adaptnet.fit(model, (x, y), val=(x, y), loss="cross_entropy", lr=0.1, epochs=3,
                          metrics=("loss", "accuracy", "steps"))
    assert 1 <= result.history[-1]["train/steps"] <= 4
    assert not torch.equal(act.halting.head.bias, before)  # the ponder cost trained the halting
    exits = adaptnet.EarlyExit([nn.Linear(8, 8), nn.Linear(8, 8)],
                               [nn.Linear(8, 3), nn.Linear(8, 3)], threshold=0.5)
    result = adaptnet.fit(exits, (x, y), val=(x, y), loss="cross_entropy", lr=0.1, epochs=2,
                          metrics=("loss", "accuracy", "exits", "macs"))
    shares = result.history[-1]["val/exits"]
    assert sum(shares.values()) == pytest.approx(1.0)
    first = float(shares.get("0", 0.0))  # samples leaving at exit 0 skip stage 1 and head 1
    macs = (64 + 24) + (1 - first) * (64 + 24)
    assert result.history[-1]["val/macs"] == pytest.approx(macs)


def test_run_directory_logs_and_a_line_per_epoch_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=3, batch_size=50, run_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and lines[-1]["step"] == 6
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    err = capsys.readouterr().err.splitlines()  # no bar under CI or in a log: plain lines
    assert [line.split(":")[0] for line in err] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert f"epoch 3/3: train loss {lines[-1]['train/loss']:.4g} (" in err[-1]
    adaptnet.fit(mlp(), (x, y), epochs=4, batch_size=50, run_dir=tmp_path, resume=True)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"resumed from {tmp_path / 'checkpoints' / 'step-000000006'} (step 6)"
    assert err[1].startswith("epoch 4/4: train loss ")
    adaptnet.fit(mlp(), (x, y), epochs=1, batch_size=50, progress=False)
    assert capsys.readouterr().err == ""
    adaptnet.fit(mlp(), (x, y), epochs=1, batch_size=50, progress=True)  # the bar, forced on
    assert "epoch 1" in capsys.readouterr().err
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000000006", "step-000000008"]  # keep_checkpoints=2


def _train(run_dir: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    whole = _train(tmp_path / "whole", tmp_path / "whole.safetensors")
    victim = _train(tmp_path / "killed", tmp_path / "killed.safetensors")
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpts.is_dir() and any(ckpts.glob("step-*"))):
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.4))  # an arbitrary step, possibly mid-checkpoint
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _train(tmp_path / "killed", tmp_path / "killed.safetensors", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "killed.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from uninterrupted"
    logged = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in logged] == list(range(1, 13))


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path, checkpoint_every=3)
    newest = sorted((tmp_path / "checkpoints").iterdir())[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    model = mlp()
    with pytest.warns(RuntimeWarning, match=r"step-000000008 cannot be used .*falling back to "
                      r"the previous one"):
        result = adaptnet.fit(model, (x, y), epochs=3, batch_size=25, run_dir=tmp_path,
                              resume=True)
    assert result.resumed_from.name == "step-000000006"
    assert result.steps == 12


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_weights(tmp_path):
    x, y = data()
    x[57, 3] = float("nan")  # lands in some batch of epoch 1
    model = mlp()
    with pytest.raises(NonFiniteError, match=r"step \d+ \(epoch 1\): the loss is nan, with "
                       r"non-finite gradients in 0.weight, 0.bias, 2.weight, 2.bias. The "
                       r"weights and buffers were not updated; the last good checkpoint is "
                       r".*step-0+2.*"
                       r"nonfinite='skip'") as info:
        adaptnet.fit(model, (x, y), epochs=1, batch_size=10, run_dir=tmp_path,
                     checkpoint_every=2)
    assert info.value.parameters == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    result = adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=10, nonfinite="skip")
    assert result.skipped == 2 and result.steps == 20  # one bad batch per epoch, skipped


@pytest.mark.parametrize(("options", "message"), [
    ({"optimizer": "adamw2"}, r"optimizer: unknown optimizer 'adamw2'; expected one of sgd, "
     r"adam, adamw, rmsprop. Did you mean 'adamw'\?"),
    ({"lr": -0.1}, r"lr: the learning rate must be positive and finite, got -0.1"),
    ({"optimizer": None, "scheduler": "StepLR"}, r"scheduler: 'StepLR' needs an optimizer, but "
     r"optimizer is None"),
    ({"scheduler": "StepLr"}, r"unknown scheduler 'StepLr'.*Did you mean 'StepLR'\?"),
    ({"scheduler": "StepLR", "scheduler_args": {"step": 3}}, r"scheduler_args: StepLR\(\{'step': "
     r"3\}\) failed"),
    ({"nesterov": True}, r"nesterov=True needs optimizer='sgd' and momentum > 0"),
    ({"epochz": 3}, r"epochz: unknown option; did you mean 'epochs'\?"),
    ({"resume": True}, r"resume=True needs run_dir"),
    ({"loss": "mae"}, r"unknown loss 'mae'"),
])
def test_bad_configuration(options, message):
    x, y = data()
    with pytest.raises(ConfigError, match=message):
        adaptnet.fit(mlp(), (x, y), **options)


def test_every_problem_is_reported_at_once_and_bad_data():
    x, y = data()
    with pytest.raises(ConfigError, match=r"(?s)optimizer: unknown.*lr: the learning rate.*"
                       r"epochs: Input should be greater than or equal to 1 \(got 0\)"):
        adaptnet.fit(mlp(), (x, y), optimizer="adagrad", lr=0, epochs=0)
    with pytest.raises(ConfigError, match=r"prediction of shape \(10, 1\) and a target of shape "
                       r"\(10,\); they would broadcast silently"):
        adaptnet.fit(mlp(), (x[:10], y[:10, 0]))
    labels = torch.randint(0, 3, (10,))  # class labels under the default loss
    with pytest.raises(ConfigError, match=r"integer targets of shape \(10,\) for a prediction "
                       r"of shape \(10, 3\): class labels\? Use loss='cross_entropy'"):
        adaptnet.fit(nn.Linear(10, 3), (x[:10], labels))
    with pytest.raises(ConfigError, match=r"train must be \(inputs, targets\) with one row per "
                       r"sample, got 2 tensor\(s\) with \[99, 100\] rows"):
        adaptnet.fit(mlp(), (x[:99], y))


@pytest.mark.slow
@pytest.mark.parametrize("data", ["tensors", "loader"])
def test_ddp_two_processes_equal_one_process(tmp_path, data):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    extra = ["--loader"] if data == "loader" else []
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(SCRIPT), str(tmp_path / "ddp"),
                          str(tmp_path / "ddp.safetensors"), "--ddp-model", "--batch", "8",
                          *extra], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one"),
                          str(tmp_path / "one.safetensors"), "--ddp-model", "--batch", "16",
                          *extra], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "ddp.safetensors"), load_file(tmp_path / "one.safetensors")
    assert a.keys() == b.keys() and "back.weight" not in a  # the tie is stored once
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    logged = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 4  # rank 0 alone logs


def test_evaluate_reports_loss_accuracy_and_perplexity():
    torch.manual_seed(0)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    net = nn.Linear(4, 3)
    values = adaptnet.evaluate(net, (x, y), loss="cross_entropy",
                               metrics=("loss", "accuracy", "perplexity"), batch_size=16)
    logits = net(x).detach()
    assert values["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)))
    assert values["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert values["perplexity"] == pytest.approx(torch.tensor(values["loss"]).exp().item())
    assert net.training  # the mode is restored


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


def test_nonfinite_step_restores_batchnorm_statistics_too():
    x, y = data()
    x[3, 0] = float("nan")  # in the first batch of epoch 1 (batch_size=100: one batch)
    model = bn_net()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="weights and buffers were not updated"):
        adaptnet.fit(model, (x, y), epochs=1, batch_size=100)
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    x2, y2 = data(200)
    x2[150, 2] = float("nan")
    model = bn_net()
    result = adaptnet.fit(model, (x2, y2), epochs=2, batch_size=50, nonfinite="skip")
    assert result.skipped == 2
    bn = model[1]
    assert bool(torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all())
    assert int(bn.num_batches_tracked) == 6  # 8 batches, the 2 skipped ones not counted
    model.eval()
    assert bool(torch.isfinite(model(torch.randn(8, 10))).all())


def test_pondernet_with_a_nan_sample_is_skipped_not_a_sampling_crash():
    from adaptnet.models import build

    torch.manual_seed(0)
    net = build("pondernet_gru", bits=8)
    x = torch.randint(0, 2, (64, 8)).float()
    y = (x.sum(1) % 2).long()
    x[5, 0] = float("nan")
    result = adaptnet.fit(net, (x, y), epochs=1, batch_size=32, loss="cross_entropy",
                          nonfinite="skip")
    assert result.skipped == 1 and result.steps == 2
    with pytest.raises(NonFiniteError, match=r"step 1 .*non-finite gradients in depth"):
        adaptnet.fit(build("pondernet_gru", bits=8), (x, y), epochs=1, batch_size=32,
                     loss="cross_entropy")
