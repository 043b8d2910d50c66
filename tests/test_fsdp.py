"""Tie-aware FSDP2 (``adaptnet.shard``, ``fit(strategy="fsdp")``) under torchrun on CPU/gloo."""

from __future__ import annotations

import json
import os
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


def test_two_sharded_processes_equal_one_process_with_ties_and_unused_parameters(tmp_path):
    """An embedding tied to the head, a transposed tie, a shared block and a rare branch
    (unused on some ranks in some steps): 2 FSDP2 ranks follow 1 process within 1e-6, and the
    weights round-trip through adaptnet's safetensors into a sharded model."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(SCRIPT), str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    plan = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert plan == {"units": ["mid", ""], "merged": ["blocks.0"]}  # blocks.0 is blocks.1
    a = load_file(tmp_path / "one" / "weights.safetensors")
    b = load_file(tmp_path / "two" / "weights.safetensors")
    c = load_file(tmp_path / "two" / "reloaded.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert "head.weight" not in a and "back.weight" not in a  # ties stored once
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
        assert torch.equal(c[k], b[k]), k


def test_shard_without_a_process_group_says_how_to_get_one():
    with pytest.raises(ConfigError, match=r"FSDP2 needs a process group, and there is none. "
                       r"Run under torchrun"):
        adaptnet.shard(nn.Linear(2, 2))


def test_fsdp_refuses_checkpoints_it_cannot_write_yet(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy='fsdp' writes no checkpoints yet"):
        adaptnet.fit(nn.Linear(2, 1), (torch.randn(4, 2), torch.randn(4, 1)),
                     strategy="fsdp", run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"strategy: Input should be 'ddp' or 'fsdp'"):
        adaptnet.fit(nn.Linear(2, 1), (torch.randn(4, 2), torch.randn(4, 1)), strategy="zero")
