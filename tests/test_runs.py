"""Run directories never lose work: resume checks, checksums, pruning, the lock.

Each test here failed on the code before the "Trustworthy by default" issue.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import adaptnet
from adaptnet.cli import app
from adaptnet.errors import ResumeError, RunLockedError
from conftest import mlp
from conftest import regression_xy as data

runner = CliRunner()


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


# ---------------------------------------------------------------- 1. resume with another recipe


def test_resume_with_changed_model_args_refuses_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    args = ["train", "mnist1d-mlp", "train.epochs=1", "--limit", "64", "--run-dir", str(run)]
    assert runner.invoke(app, args).exit_code == 0
    before = snapshot(run)
    result = runner.invoke(app, [*args[:3], "model.hidden=17", *args[3:], "--resume"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "ResumeError" in text and "model.hidden: (absent) -> 17" in text
    assert "Traceback" not in text
    assert snapshot(run) == before
    again = runner.invoke(app, [*args, "train.epochs=2", "--resume"])  # epochs differ too
    assert again.exit_code == 2 and "train.epochs: 1 -> 2" in " ".join(again.output.split())
    same = runner.invoke(app, [*args, "--resume"])  # the run's own recipe: resumes, finishes
    assert same.exit_code == 0, same.output


# ------------------------------------------------ 2. every checkpoint unreadable; pruning order


def test_resume_with_no_usable_checkpoint_refuses_instead_of_starting_over(tmp_path):
    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path, checkpoint_every=3)
    for ckpt in (tmp_path / "checkpoints").iterdir():
        (ckpt / "state.pt").write_bytes(b"garbage")
    before = snapshot(tmp_path)
    model = mlp()
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(ResumeError, match=r"(?s)none of its 2 checkpoint\(s\) can be used:\n  "
                       r"step-000000008: CheckpointCorruptError: state.pt does not match its "
                       r"checksum.*\n  step-000000006: .*Nothing was changed"), \
            pytest.warns(RuntimeWarning, match="falling back"):
        adaptnet.fit(model, (x, y), epochs=3, batch_size=25, run_dir=tmp_path, resume=True)
    assert snapshot(tmp_path) == before
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights, strict=True))


def test_resume_with_other_parameter_groups_refuses(tmp_path):
    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=1, batch_size=25, run_dir=tmp_path, weight_decay=0.1)
    with pytest.raises(ResumeError, match=r"the checkpoint's optimizer state does not fit this "
                       r"optimizer \(ValueError: .*\). Resume with the model, optimizer and "
                       r"parameter groups the run was started with"):
        adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path, resume=True,
                     weight_decay=0.1, no_decay=[])  # one group where the run had two


def test_pruning_never_deletes_a_later_checkpoint_than_the_one_written(tmp_path):
    """A damaged newest checkpoint sorts after the ones written after the fall-back."""
    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=1, batch_size=25, run_dir=tmp_path, checkpoint_every=1,
                 keep_checkpoints=2)
    assert steps(tmp_path) == ["step-000000003", "step-000000004"]
    damaged = tmp_path / "checkpoints" / "step-000000004" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="step-000000004 cannot be used"):
        result = adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path,
                              resume=True, checkpoint_every=1, keep_checkpoints=2)
    assert result.resumed_from.name == "step-000000003" and result.steps == 8
    # Step 4 was rewritten by this run; 5..8 came after it: the newest two are kept.
    assert steps(tmp_path) == ["step-000000007", "step-000000008"]


def test_fallback_checkpoint_survives_until_the_run_passes_it(tmp_path):
    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=1, batch_size=25, run_dir=tmp_path, checkpoint_every=2,
                 keep_checkpoints=1)
    (tmp_path / "checkpoints" / "step-000000900").mkdir()  # e.g. restored from a backup
    with pytest.warns(RuntimeWarning, match="step-000000900 cannot be used"):
        adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path, resume=True,
                     checkpoint_every=2, keep_checkpoints=1)
    assert steps(tmp_path) == ["step-000000008", "step-000000900"]  # 8 kept: 900 is later


# ---------------------------------------------------------------- 3. one process per run dir


HOLD = """
import sys, time
from adaptnet._rundir import locked
with locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_a_second_process_gets_a_clear_error_and_the_first_is_untouched(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        x, y = data()
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use: another process "
                           rf"\(pid {holder.pid}\) is training into it"):
            adaptnet.fit(mlp(), (x, y), epochs=1, run_dir=tmp_path)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
        result = runner.invoke(app, ["train", "mnist1d-mlp", "--limit", "16", "--run-dir",
                                     str(tmp_path)])
        assert result.exit_code == 2 and "RunLockedError" in result.output
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    adaptnet.fit(mlp(), data(), epochs=1, run_dir=tmp_path)  # released when the holder died


@pytest.mark.slow
def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    from adaptnet._rundir import locked

    with locked(tmp_path), locked(tmp_path / "."):
        assert (tmp_path / ".lock").read_text() == str(__import__("os").getpid())
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HOLD.replace("60", "0"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and time.monotonic() - start < 60


# ------------------------------------------------------- 4. checksums and the step in each file


def test_bit_flip_in_tensor_data_falls_back_to_the_previous_checkpoint(tmp_path):
    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path, checkpoint_every=3)
    weights = tmp_path / "checkpoints" / "step-000000008" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x01  # one bit of the last tensor's data: still a valid safetensors file
    weights.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=r"step-000000008 cannot be used \(CheckpointCorrupt"
                      r"Error: model.safetensors does not match its checksum"):
        result = adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path,
                              resume=True)
    assert result.resumed_from.name == "step-000000006"


def test_swapped_state_is_caught_by_checksum_and_by_the_step_inside(tmp_path):
    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path, checkpoint_every=3)
    new, old = (tmp_path / "checkpoints" / f"step-00000000{s}" for s in (8, 6))
    (new / "state.pt").write_bytes((old / "state.pt").read_bytes())
    with pytest.warns(RuntimeWarning, match=r"state\.pt does not match its checksum"):
        result = adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path,
                              resume=True)
    assert result.resumed_from.name == "step-000000006"
    # With the checksum updated to match, the step recorded inside state.pt still disagrees.
    adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path / "b",
                 checkpoint_every=3)
    new, old = (tmp_path / "b" / "checkpoints" / f"step-00000000{s}" for s in (8, 6))
    (new / "state.pt").write_bytes((old / "state.pt").read_bytes())
    record = json.loads((new / "checkpoint.json").read_text())
    record["sha256"]["state.pt"] = json.loads((old / "checkpoint.json").read_text())[
        "sha256"]["state.pt"]
    (new / "checkpoint.json").write_text(json.dumps(record))
    with pytest.warns(RuntimeWarning, match=r"state\.pt is from step 6, not 8"):
        result = adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path / "b",
                              resume=True)
    assert result.resumed_from.name == "step-000000006"


def test_state_missing_keys_is_a_damaged_checkpoint_not_a_keyerror(tmp_path):
    from adaptnet._io import sha256_file
    from adaptnet.train._checkpoint import MANIFEST

    x, y = data()
    adaptnet.fit(mlp(), (x, y), epochs=1, batch_size=25, run_dir=tmp_path)
    ckpt = tmp_path / "checkpoints" / "step-000000004"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, ckpt / "state.pt")
    record = json.loads((ckpt / MANIFEST).read_text())
    record["sha256"]["state.pt"] = sha256_file(ckpt / "state.pt")
    (ckpt / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(ResumeError, match=r"state\.pt lacks optimizer"):
        adaptnet.fit(mlp(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path, resume=True)


def test_a_manifest_whose_share_claim_fails_is_skipped_on_resume(tmp_path):
    """A ShareError from a checkpoint's tie manifest is one more reason to fall back."""
    import safetensors
    import safetensors.torch

    from adaptnet._io import sha256_file
    from adaptnet.train._checkpoint import MANIFEST

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1))

    x, y = data()
    adaptnet.fit(net(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path)
    ckpt = tmp_path / "checkpoints" / "step-000000008"
    weights = ckpt / "model.safetensors"
    with safetensors.safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        manifest = json.loads(f.metadata()["adaptnet"])
    manifest["modules"] = {"1": "0"}  # ReLU "is" the Linear: share() refuses
    safetensors.torch.save_file(tensors, weights, metadata={"adaptnet": json.dumps(manifest)})
    record = json.loads((ckpt / MANIFEST).read_text())
    record["sha256"]["model.safetensors"] = sha256_file(weights)  # the checksum agrees
    (ckpt / MANIFEST).write_text(json.dumps(record))
    with pytest.warns(RuntimeWarning, match=r"step-000000008 cannot be used \(ShareError"):
        result = adaptnet.fit(net(), (x, y), epochs=2, batch_size=25, run_dir=tmp_path,
                              resume=True)
    assert result.resumed_from.name == "step-000000004"


def test_only_the_run_directory_module_names_its_files():
    """Every file of a run directory is named once, in adaptnet._rundir (docstrings aside)."""
    import ast

    from adaptnet import _rundir

    names = {getattr(_rundir, k) for k in ("CONFIG", "WEIGHTS", "RESULTS", "SUMMARY", "METRICS",
                                            "TENSORBOARD", "REPORT", "PLOTS", "CHECKPOINTS",
                                            "CHECKPOINT_STATE", "CHECKPOINT_MANIFEST", "LOCK")}
    assert len(names) == 12
    src = Path(adaptnet.__file__).parent
    found = []
    for path in src.rglob("*.py"):
        if path.name == "_rundir.py":
            continue
        tree = ast.parse(path.read_text())
        skip = {id(n.body[0].value) for n in ast.walk(tree)  # docstrings
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
                and n.body and isinstance(n.body[0], ast.Expr)}
        skip |= {id(c) for n in ast.walk(tree) if isinstance(n, ast.Assign)  # __all__
                 and any(getattr(t, "id", None) == "__all__" for t in n.targets)
                 for c in ast.walk(n.value)}
        found += [f"{path.relative_to(src).as_posix()} {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in names and id(n) not in skip]
    # torch.hub's cache has a checkpoints folder too: not a run directory
    assert found == ["transfer/_load.py 'checkpoints'"], found


def test_results_and_checkpoint_manifests_are_typed_records_and_damage_is_named(tmp_path):
    from adaptnet import _rundir
    from adaptnet.errors import CheckpointCorruptError

    results = _rundir.RunResults(
        recipe="r", model="mlp", dataset="digits", samples={"train": 8, "test": 4},
        train_seconds=1.5, epochs=1, history=[{"epoch": 1, "train/loss": 0.5}],
        test={"loss": 0.4, "accuracy": 0.75}, params={"unique": 9, "per_use": 9, "trainable": 9},
        infer_ms_per_1k=2.0, counts={}, metric=("accuracy", 0.75), weights_sha256="0" * 64)
    _rundir.write_results(tmp_path, results)
    assert _rundir.read_results(tmp_path) == results
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["metric"] == ["accuracy", 0.75] and "decode" not in raw  # the format of 0.1
    for change, where in (({"epochs": "many"}, "epochs"), ({"metric": 3}, "metric"),
                          ({"surprise": 1}, "surprise")):
        (tmp_path / "results.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(adaptnet.errors.RunDirError, match=rf"is not what a run records "
                                                              rf"\({where}"):
            _rundir.read_results(tmp_path)
    del raw["test"]
    (tmp_path / "results.json").write_text(json.dumps(raw))
    with pytest.raises(adaptnet.errors.RunDirError, match=r"\(test: Field required\)"):
        _rundir.read_results(tmp_path)

    assert _rundir.read_manifest(tmp_path) is None  # an older adaptnet's checkpoint
    manifest = _rundir.CheckpointManifest(7, {"state.pt": "a" * 64})
    _rundir.write_manifest(tmp_path, manifest)
    assert _rundir.read_manifest(tmp_path) == manifest
    for bad in ('{"step": "7", "sha256": {}}', '{"step": 7}', "[]", "{", '{"step": 7, '
                '"sha256": {"state.pt": 1}}'):
        (tmp_path / "checkpoint.json").write_text(bad)
        with pytest.raises(CheckpointCorruptError, match=r"checkpoint\.json is malformed"):
            _rundir.read_manifest(tmp_path)
