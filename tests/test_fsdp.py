"""Tie-aware FSDP2 (``adaptnet.shard``, ``fit(strategy="fsdp")``) under torchrun on CPU/gloo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adaptnet
from adaptnet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fsdp_script.py"


def _launch(out: Path, ranks: int, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out.mkdir(exist_ok=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else []
    done = subprocess.run([sys.executable, *launcher, str(SCRIPT), str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """3 epochs (36 steps), checkpointed every 5 steps: 2 FSDP2 ranks in ``two``, 1 process
    in ``one``."""
    root = tmp_path_factory.mktemp("fsdp")
    _launch(root / "two", 2)
    _launch(root / "one", 1)
    return root


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "weights.safetensors")


def test_two_sharded_processes_equal_one_process_with_ties_and_unused_parameters(whole):
    """An embedding tied to the head, a transposed tie, a shared block and a rare branch
    (unused on some ranks in some steps): 2 FSDP2 ranks follow 1 process within 1e-6, and the
    weights round-trip through adaptnet's safetensors into a sharded model."""
    plan = json.loads((whole / "two" / "plan.json").read_text())
    assert plan == {"units": ["mid", ""], "merged": ["blocks.0"]}  # blocks.0 is blocks.1
    a, b = _weights(whole / "one"), _weights(whole / "two")
    c = load_file(whole / "two" / "reloaded.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert "head.weight" not in a and "back.weight" not in a  # ties stored once
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
        assert torch.equal(c[k], b[k]), k


def _cut(out: Path) -> None:
    """Leave the run in ``out`` as if stopped at step 20, mid-epoch 2 (batch 8 of 12): its
    later checkpoints gone (its weights file is rewritten by the resumed run)."""
    for late in (out / "run" / "checkpoints").glob("step-*"):
        if int(late.name.removeprefix("step-")) > 20:
            shutil.rmtree(late)


def _loss(out: Path) -> list[float]:
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if '"train/loss"' in line]


@pytest.mark.slow
def test_sharded_checkpoints_resume_mid_epoch_under_any_strategy(whole, tmp_path):
    """FSDP2 run_dir checkpoints hold the optimizer state gathered whole, keyed by name; a run
    cut mid-epoch resumes to the uninterrupted run's weights under FSDP2, and a checkpoint
    written by 2 FSDP2 ranks resumes in 1 process, and one written by 1 process under FSDP2."""
    state = torch.load(whole / "two" / "run" / "checkpoints" / "step-000000020" / "state.pt",
                       weights_only=True)
    assert state["optimizer"]["state"]["embed.weight"]["exp_avg"].shape == (12, 8)  # whole
    assert "head.weight" not in state["optimizer"]["state"]  # a tie is one parameter
    for source, cut in (("two", "p2"), ("two", "c21"), ("one", "c12")):
        shutil.copytree(whole / source, tmp_path / cut)
        _cut(tmp_path / cut)
    _launch(tmp_path / "p2", 2, "--resume")
    _launch(tmp_path / "c21", 1, "--resume")
    _launch(tmp_path / "c12", 2, "--resume")
    two, one = _weights(whole / "two"), _weights(whole / "one")
    resumed = _weights(tmp_path / "p2")
    assert all(torch.equal(resumed[k], two[k]) for k in two), "FSDP2 resume differs"
    for got, want in ((_weights(tmp_path / "c21"), one), (_weights(tmp_path / "c12"), two)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # the cut epoch's loss sums every rank's batches before and after the cut
    torch.testing.assert_close(_loss(tmp_path / "p2"), _loss(whole / "two"), rtol=1e-9, atol=0)
    torch.testing.assert_close(_loss(tmp_path / "c21"), _loss(whole / "one"), rtol=1e-6, atol=0)


def test_shard_without_a_process_group_says_how_to_get_one():
    with pytest.raises(ConfigError, match=r"FSDP2 needs a process group, and there is none. "
                       r"Run under torchrun"):
        adaptnet.shard(nn.Linear(2, 2))


def test_an_unknown_strategy_is_refused():
    with pytest.raises(ConfigError, match=r"strategy: Input should be 'ddp' or 'fsdp'"):
        adaptnet.fit(nn.Linear(2, 1), (torch.randn(4, 2), torch.randn(4, 1)), strategy="zero")
