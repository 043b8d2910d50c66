"""What the terminal shows: tables at its width with every number whole, plain-text listings,
and a README tour whose numbers repeat run to run."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import adaptnet
import adaptnet.models
from adaptnet import cli

ROOT = Path(__file__).resolve().parents[1]


def widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


@pytest.mark.parametrize("columns", [60, 100, 200])
def test_summary_fits_the_terminal_and_never_cuts_a_number(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    net = adaptnet.models.build("lstm_lm", vocab_size=100_000, embed_size=64, hidden=64)
    s = adaptnet.summary(net)
    text = str(s)
    for n in (s.unique, s.per_use, 6_400_000, 6_500_000, 66_560):
        assert f"{n:,}" in text
    assert "…" not in text
    # this table needs 77 columns at least (no name cut inside a word): a narrower terminal
    # gets that, a wider one its own
    assert widest(text) <= max(columns, 77)
    names = [r.name for r in s.rows] + ["embedding.weight"]
    assert all(re.search(rf"(^|\s){re.escape(n)}(\s|$)", text, re.M) for n in names)
    if columns >= 100:
        assert "weight = embedding.weight" in text  # room enough: not even wrapped


def test_a_frozen_resnet18_summary_fits_80_columns_with_every_name_whole(monkeypatch):
    """Nothing shared: no "per use" (it would repeat "unique") and no "shares" column, and
    so room at 80 columns for torchvision's longest names, whole."""
    import torchvision

    monkeypatch.setenv("COLUMNS", "80")
    net = torchvision.models.resnet18(num_classes=5)
    adaptnet.transfer.freeze_blocks(net, trainable=1)  # BatchNorms become FrozenBatchNorm
    text = str(adaptnet.summary(net))
    lines = text.splitlines()
    assert widest(text) <= 80 and "…" not in text
    assert lines[1].split() == ["module", "type", "unique", "trainable", "frozen"]
    for name, module in net.named_modules():
        if list(module.parameters(recurse=False)):
            assert re.search(rf"^{re.escape(name)}\s+{type(module).__name__}\s", text, re.M), name


def test_compare_table_keeps_every_number_at_80_columns(tmp_path, monkeypatch):
    rows = [{"variant": f"model.tied={v}, a long variant name that must wrap", "metric": "accuracy",
             "value": 0.9123, "unique_params": 3_622_618 + i, "trainable_params": 3_622_618,
             "macs": 123_456_789.0, "infer_ms_per_1k": 1234.56, "train_seconds": 98.7,
             "run_dir": str(tmp_path / f"v{i}")} for i, v in enumerate(("true", "false"))]
    (tmp_path / "compare.json").write_text(json.dumps(rows))
    buf = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buf, width=80, color_system=None))
    cli._print_compare(rows, tmp_path, "compare demo")
    text = buf.getvalue().split("report:")[0]  # the table (paths after it are not cut)
    for number in ("3,622,618", "3,622,619", "123,456,789", "1234.56", "91.23%", "98.7"):
        assert number in text
    assert "…" not in text and widest(text) <= 80


@pytest.mark.slow
def test_models_prints_plain_text_at_the_terminal_width():
    env = {**os.environ, "COLUMNS": "70", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "adaptnet.cli", "models"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "``" not in done.stdout and ":class:" not in done.stdout
    assert "A ReLU MLP with layers linear" in done.stdout
    assert widest(done.stdout) <= 70


def test_build_with_a_seed_repeats_and_leaves_the_global_state_alone():
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = adaptnet.models.build("mlp", in_features=8, num_classes=3, seed=7)
    b = adaptnet.models.build("mlp", in_features=8, num_classes=3, seed=7)
    c = adaptnet.models.build("mlp", in_features=8, num_classes=3, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    pairs = list(zip(a.parameters(), b.parameters(), c.parameters(), strict=True))
    assert all(torch.equal(p, q) for p, q, _ in pairs)
    assert not all(torch.equal(p, r) for p, _, r in pairs)
    with pytest.raises(adaptnet.errors.ModelError, match=r"seed must be a non-negative int, "
                       r"got -1"):
        adaptnet.models.build("mlp", in_features=8, num_classes=3, seed=-1)


@pytest.mark.slow
def test_readme_tour_prints_the_numbers_it_shows(tmp_path):
    """The README's first Python block, run in a fresh process, prints what it says: the
    numbers shown there came from another run, so they repeat run to run."""
    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    shown = re.search(r"# prints (\{.*\})", block)
    assert shown, "the tour's first block shows what it prints"
    script = tmp_path / "tour.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    values = eval(done.stdout.strip().splitlines()[-1])  # a dict of floats
    expected = eval(shown.group(1))
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        assert round(values[key], 3) == value, key
    assert values["steps"] < 3  # the tour shows adaptation: digits halt long before step 6
