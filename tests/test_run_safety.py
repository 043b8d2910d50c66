"""Nothing is lost, nothing followed, nothing silently wrong: run directories as untrusted data.

Each test here is an attack or accident that succeeded on the previous release
(links in a run directory, a resume that found nothing, a second ``fit`` over a
run, an unverifiable checkpoint, damaged final weights, a duplicated row, file
modes).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import adaptnet
from adaptnet.cli import app
from adaptnet.errors import ResumeError, RunDirError
from adaptnet.recipes import load_model, load_run
from adaptnet.train import _loop
from conftest import mlp
from conftest import regression_xy as data

runner = CliRunner()
TRAIN = ["train", "mnist1d-mlp", "train.epochs=1", "--limit", "64"]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def fitted(run: Path, **kw) -> adaptnet.train.FitResult:
    return adaptnet.fit(mlp(), data(), epochs=kw.pop("epochs", 2), batch_size=25,
                        run_dir=run, **kw)


# ---------------------------------------------------------------- 3. links are never followed

@pytest.mark.parametrize("link", [".lock", "metrics.jsonl", "plots", "checkpoints"])
def test_a_link_in_a_run_directory_is_refused_and_its_target_untouched(tmp_path, link):
    run, victim = tmp_path / "run", tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    target = victim if link in ("plots", "checkpoints") else victim / "precious.txt"
    if link != ".lock":
        assert runner.invoke(app, [*TRAIN, "--run-dir", str(run)]).exit_code == 0
        if (run / link).is_dir():
            shutil.rmtree(run / link)
        else:
            (run / link).unlink(missing_ok=True)
    run.mkdir(exist_ok=True)
    (run / link).symlink_to(target)
    for extra in ([], ["--resume"]):
        result = runner.invoke(app, [*TRAIN, "--run-dir", str(run), *extra])
        assert result.exit_code == 2, result.output
        assert "holds symbolic links" in " ".join(result.output.split())
    if link != ".lock":  # reading the run follows no link either
        result = runner.invoke(app, ["eval", str(run)])
        assert result.exit_code == 2 and "symbolic links" in " ".join(result.output.split())
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_text() == "keep me"


# ------------------------------------------------- 4, 5. a run is never trained over

def test_a_finished_run_without_checkpoints_is_not_retrained_by_a_resume(tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, [*TRAIN, "--run-dir", str(run)]).exit_code == 0
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    result = runner.invoke(app, [*TRAIN, "--run-dir", str(run), "--resume"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "ResumeError" in text and "no checkpoint to continue from" in text
    assert snapshot(run) == before


def test_fit_never_trains_over_a_run_and_resumes_only_its_own(tmp_path):
    run = tmp_path / "r"
    fitted(run, epochs=5)
    before = snapshot(run)
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl, tensorboard\); "
                       r"fit\(\) never trains over one\. Continue it with resume=True"):
        fitted(run, epochs=2)
    assert snapshot(run) == before
    again = fitted(run, epochs=6, resume=True)
    assert again.resumed_from is not None and again.resumed_from.name == "step-000000020"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------- 6. unverifiable checkpoints

def test_a_checkpoint_without_checksums_resumes_only_when_asked(tmp_path):
    run = tmp_path / "r"
    fitted(run)
    for manifest in (run / "checkpoints").glob("*/checkpoint.json"):
        manifest.unlink()  # the older format
    before = snapshot(run)
    with pytest.raises(ResumeError, match=r"no checkpoint.json: written by an older adaptnet, "
                       r"its files cannot be verified; resume from it only if you trust it "
                       r"\(resume_unverified=True"):
        fitted(run, epochs=3, resume=True)
    assert snapshot(run) == before
    with pytest.warns(RuntimeWarning, match=r"resuming from it unverified, as asked"):
        out = fitted(run, epochs=3, resume=True, resume_unverified=True)
    assert out.resumed_from.name == "step-000000008" and len(out.history) == 3
    with pytest.raises(adaptnet.errors.ConfigError, match=r"resume_unverified=True goes with "
                       r"resume=True"):
        fitted(tmp_path / "other", resume_unverified=True)


@pytest.mark.parametrize(("key", "value"), [("history", 5), ("epoch", 10**6), ("batch", -5)])
def test_a_state_with_impossible_counts_is_a_damaged_checkpoint(tmp_path, key, value):
    run = tmp_path / "r"
    fitted(run)
    *older, newest = sorted((run / "checkpoints").iterdir())
    for path in older:  # only the damaged one: no fallback
        shutil.rmtree(path)
    state = torch.load(newest / "state.pt", weights_only=True)
    state[key] = value
    torch.save(state, newest / "state.pt")
    (newest / "checkpoint.json").unlink()
    with pytest.raises(ResumeError, match=r"state.pt( holds|'s history)"), \
            pytest.warns(RuntimeWarning):
        fitted(run, epochs=3, resume=True, resume_unverified=True)


# ------------------------------------------------- 7. the final weights are checksummed

def test_damaged_final_weights_are_refused_by_eval_load_run_and_load_model(tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, [*TRAIN, "--run-dir", str(run)]).exit_code == 0
    results = json.loads((run / "results.json").read_text())
    assert len(results["weights_sha256"]) == 64
    weights = run / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x7F  # exponent bits of the last float
    weights.write_bytes(bytes(raw))
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 2, result.output
    assert "does not match the checksum results.json records" in " ".join(result.output.split())
    for load in (lambda: load_run(run), lambda: load_model(run)):
        with pytest.raises(RunDirError, match=r"does not match the checksum"):
            load()


# ------------------------------------------------- 8. a kill between a row and its checkpoint

class Killed(Exception):
    pass


def test_a_kill_between_the_epoch_row_and_its_checkpoint_logs_no_row_twice(tmp_path,
                                                                           monkeypatch):
    """The mid-epoch checkpoint at the epoch's last step is written, then the epoch's row,
    then the kill: the resume finishes that epoch again but logs its row once."""
    run = tmp_path / "r"
    real = _loop.write_checkpoint

    def dies_at_the_epoch_end(run_dir, step, model, state, keep):
        if state["batch"] == 0 and state["epoch"] == 1:
            raise Killed
        return real(run_dir, step, model, state, keep)

    monkeypatch.setattr(_loop, "write_checkpoint", dies_at_the_epoch_end)
    with pytest.raises(Killed):
        fitted(run, checkpoint_every=4)  # 4 batches an epoch: a checkpoint at its last step
    monkeypatch.setattr(_loop, "write_checkpoint", real)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    out = fitted(run, checkpoint_every=4, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and len(out.history) == 2


# ------------------------------------------------- 9. file modes as a plain write leaves them

def test_atomic_writes_honour_the_umask_and_an_existing_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = adaptnet.save(mlp(), tmp_path / "m.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o664)
        adaptnet.save(mlp(), path)  # over an existing file: its mode stays
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
        fitted(tmp_path / "r")
        for p in (tmp_path / "r" / "checkpoints").rglob("*"):
            assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p
        os.umask(0o077)
        private = adaptnet.save(mlp(), tmp_path / "p.safetensors")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_the_command_line_resumes_an_unverifiable_run_only_when_asked(tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, [*TRAIN, "--run-dir", str(run)]).exit_code == 0
    for manifest in (run / "checkpoints").glob("*/checkpoint.json"):
        manifest.unlink()
    result = runner.invoke(app, [*TRAIN, "--run-dir", str(run), "--resume"])
    assert result.exit_code == 2 and "--resume-unverified" in " ".join(result.output.split())
    result = runner.invoke(app, [*TRAIN, "--run-dir", str(run), "--resume",
                                 "--resume-unverified"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, [*TRAIN, "--run-dir", str(tmp_path / "n"),
                               "--resume-unverified"]).exit_code == 2


# ------------------------------------------------- 10. a full disk, a file in the way

def test_a_full_disk_mid_run_is_one_message_and_keeps_the_last_checkpoint(tmp_path,
                                                                         monkeypatch):
    run = tmp_path / "r"
    fitted(run)
    real = torch.save

    def full(obj, f, *a, **kw):  # torch.save's own message when the disk fills
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunDirError, match=r"cannot write checkpoint .*step-000000012: "
                       r"PytorchStreamWriter failed writing file data/0: file write failed "
                       r"\(RuntimeError\)\. The previous checkpoint is kept"):
        fitted(run, epochs=3, resume=True)
    monkeypatch.setattr(torch, "save", real)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000000004", "step-000000008"]  # nothing half-written left
    assert fitted(run, epochs=3, resume=True).resumed_from.name == "step-000000008"


def test_a_log_that_cannot_be_written_and_a_file_named_checkpoints_are_one_message(
        tmp_path, monkeypatch):
    import errno

    from torch.utils import tensorboard

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorboard, "SummaryWriter", no_space)
    with pytest.raises(RunDirError, match=r"cannot write the training log in .*: No space left "
                       r"on device \(OSError\)"):
        fitted(tmp_path / "a")
    monkeypatch.undo()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoints").write_text("not a directory")
    with pytest.raises(RunDirError, match=r"checkpoints is a file, where fit\(\) writes its "
                       r"checkpoints"):
        fitted(tmp_path / "b")
    result = runner.invoke(app, [*TRAIN, "--run-dir", str(tmp_path / "b")])
    assert result.exit_code == 2 and "Traceback" not in result.output


# ------------------------------------------------- extending a finished run

def test_a_finished_run_is_extended_only_when_asked_and_only_in_length(tmp_path):
    run = tmp_path / "run"
    args = [*TRAIN, "--run-dir", str(run)]
    assert runner.invoke(app, args).exit_code == 0
    before = snapshot(run)
    longer = [*args, "train.epochs=3", "--resume"]
    result = runner.invoke(app, longer)  # a changed recipe, without --extend
    assert result.exit_code == 2 and "train.epochs: 1 -> 3" in " ".join(result.output.split())
    result = runner.invoke(app, [*longer, "model.hidden=17", "--extend"])  # another change
    assert result.exit_code == 2 and "model.hidden: (absent) -> 17" in " ".join(
        result.output.split())
    result = runner.invoke(app, [*args, "--resume", "--extend"])  # no longer than before
    assert result.exit_code == 2 and "give train.epochs above the run's 1" in " ".join(
        result.output.split())
    assert snapshot(run) == before
    assert runner.invoke(app, [*longer, "--extend"]).exit_code == 0
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 3 and len(results["history"]) == 3
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["extended"] == [{"epochs": [1, 3]}] and config["train"]["epochs"] == 3
    assert runner.invoke(app, [*args, "train.epochs=3", "--resume"]).exit_code == 0  # as is
    assert runner.invoke(app, [*TRAIN, "--run-dir", str(tmp_path / "n"), "--extend"]
                         ).exit_code == 2
