"""Crash-safe, checksummed checkpoints: one directory per step, complete or absent.

``<run_dir>/checkpoints/step-000000120/`` holds ``model.safetensors`` (weights
and ties, :func:`adaptnet.save`), ``state.pt`` (optimizer, scheduler, RNG and
loop position: tensors, numbers and strings only, read back with
``torch.load(weights_only=True)``, which executes no code) and
``checkpoint.json`` (the step and the SHA-256 of both files). All three are
written into a hidden temporary directory, fsynced, and the directory is
renamed into place; older checkpoints are deleted only after that, so a crash
at any moment leaves the previous complete checkpoint. Pruning never deletes a
checkpoint of a later step than the one just written (such a checkpoint is one
a resume fell back from).

Under FSDP2 every rank calls :func:`optimizer_state` (the optimizer's shards
are gathered whole, keyed by parameter name) and :func:`adaptnet.save` (the
weights' shards are gathered); rank 0 writes. Resuming gives each rank its
shard of both, so a checkpoint resumes in one process, under DDP or under
FSDP2 at any world size, whichever wrote it.

Loading verifies the checksums, the step recorded in ``checkpoint.json`` and
in ``state.pt`` against the directory's name, the loop position's counts and
the history's form, and that the model fits, newest first; it falls back,
with a warning, past any checkpoint that fails, and refuses
(:class:`~adaptnet.errors.ResumeError`) when none passes rather than start the
run again from step 0. A checkpoint without checksums (an older format) fails
unless the caller asks to resume unverified.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptnet import _rundir
from adaptnet._io import atomic_path, plain_mode, sha256_file
from adaptnet.errors import AdaptnetError, CheckpointCorruptError, ResumeError, RunDirError
from adaptnet.sharing import load, save

__all__ = ["checkpoints", "load_latest", "optimizer_state", "restore_optimizer",
           "write_checkpoint"]

_NAME = re.compile(r"step-(\d{9})")
MANIFEST = _rundir.CHECKPOINT_MANIFEST
FILES = (_rundir.WEIGHTS, _rundir.CHECKPOINT_STATE)
STATE_KEYS = ("epoch", "batch", "step", "best", "bad_epochs", "order", "skipped", "history",
              "acc", "optimizer", "scheduler", "rng_torch", "rng_python", "rng_cuda")


def write_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any],
                     keep: int) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep``; return its directory.

    Raises:
        RunDirError: the checkpoint cannot be written (a full disk, no
            permission, ``checkpoints`` not a directory); the previous
            checkpoint is kept and nothing half-written is left.
    """
    root = Path(run_dir) / _rundir.CHECKPOINTS
    final = root / f"step-{step:09d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    except OSError as e:
        raise _unwritable(final, e) from None
    try:
        os.chmod(tmp, plain_mode(final, directory=True))  # not mkdtemp's 0700
        save(model, tmp / _rundir.WEIGHTS)
        with atomic_path(tmp / _rundir.CHECKPOINT_STATE) as path:
            torch.save(state, path)
        _rundir.write_manifest(tmp, _rundir.CheckpointManifest(
            step, {name: sha256_file(tmp / name) for name in FILES}))
        if final.exists():  # the same step again, after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(final, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = [p for p in checkpoints(run_dir) if _step(p) <= step]
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # left by a run killed while writing (the run dir is
        shutil.rmtree(stale, ignore_errors=True)  # locked: no other process is writing one)
    return final


def _unwritable(final: Path, e: Exception) -> RunDirError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    return RunDirError(f"cannot write checkpoint {final}: {reason} ({type(e).__name__}). The "
                       "previous checkpoint is kept; free space or make the run directory "
                       "writable, then resume.")


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint directories, oldest first."""
    root = Path(run_dir) / _rundir.CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def load_latest(run_dir: Path, model: nn.Module, unverified: bool = False
                ) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest sound checkpoint into ``model``; return it and its state.

    Returns None when the run has no checkpoint at all. A checkpoint without
    checksums (written by an older adaptnet) is used only with ``unverified``.

    Raises:
        ResumeError: there are checkpoints, but none passes its checks (each
            reason is listed); the model and the run directory are untouched.
    """
    found = checkpoints(run_dir)
    failures = []
    for path in reversed(found):
        try:
            state = _verified_state(path, unverified)
            load(model, path / _rundir.WEIGHTS)
        except (AdaptnetError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            failures.append(f"{path.name}: {why}")
            if path is not found[0]:
                warnings.warn(f"checkpoint {path} cannot be used ({why}); falling back to the "
                              "previous one.", RuntimeWarning, stacklevel=3)
            continue
        return path, state
    if found:
        raise ResumeError(
            f"cannot resume {run_dir}: none of its {len(found)} checkpoint(s) can be used:\n"
            + "\n".join(f"  {f}" for f in failures)
            + "\nNothing was changed. If the model or recipe changed, train into a new run "
            "directory; to start this one over, move its checkpoints/ directory away.")
    return None


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sharded: bool
                    ) -> dict[str, Any]:
    """The optimizer state a checkpoint keeps: ``opt.state_dict()`` (parameters by index),
    or, for a sharded (FSDP2) model, the whole state gathered to rank 0 on the CPU and keyed
    by parameter name (a collective: every rank calls it; the others get ``{}``)."""
    if not sharded:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def restore_optimizer(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                      names: list[str], sharded: bool) -> None:
    """Load a checkpoint's optimizer state, written by either layout, into ``opt``.

    ``names`` are the names of ``opt``'s parameters in its own order (the order
    ``opt.state_dict()`` numbers them in). A sharded model takes the state by
    name, each rank keeping its shard; any other by index.

    Raises:
        ResumeError: the state does not fit ``opt`` (other parameters or groups).
    """
    by_name = any(isinstance(k, str) for g in state["param_groups"] for k in g["params"])
    try:
        if sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )
            state = state if by_name else _rekey(state, dict(enumerate(names)))
            set_optimizer_state_dict(model, opt, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(_rekey(state, {n: i for i, n in enumerate(names)})
                                if by_name else state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ResumeError(f"the checkpoint's optimizer state does not fit this optimizer "
                          f"({type(e).__name__}: {e}). Resume with the model, optimizer and "
                          "parameter groups the run was started with.") from None


def _rekey(state: dict[str, Any], new: dict) -> dict[str, Any]:
    """An optimizer state dict whose parameter keys are mapped through ``new``."""
    return {"state": {new[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [new[k] for k in g["params"]]}
                             for g in state["param_groups"]]}


def _verified_state(path: Path, unverified: bool) -> dict[str, Any]:
    """``state.pt`` of checkpoint ``path`` once its checksums and recorded steps agree, and
    its loop position and history hold what a run records."""
    step = _step(path)
    absent = [name for name in FILES if not (path / name).is_file()]
    if absent:
        raise CheckpointCorruptError(f"incomplete: no {', '.join(absent)}")
    manifest = _rundir.read_manifest(path)
    if manifest is not None:
        if manifest.step != step:
            raise CheckpointCorruptError(f"{MANIFEST} records step {manifest.step!r}, not "
                                         f"{step}")
        for name in FILES:
            if sha256_file(path / name) != manifest.sha256.get(name):
                raise CheckpointCorruptError(f"{name} does not match its checksum (damaged, "
                                             "or copied from another checkpoint)")
    elif not unverified:  # written before checksums existed: its files cannot be verified
        raise CheckpointCorruptError(
            f"no {MANIFEST}: written by an older adaptnet, its files cannot be verified; "
            "resume from it only if you trust it (resume_unverified=True, "
            "--resume-unverified)")
    else:
        warnings.warn(f"checkpoint {path} has no {MANIFEST} (written by an older adaptnet); "
                      "resuming from it unverified, as asked.", RuntimeWarning, stacklevel=4)
    state = torch.load(path / _rundir.CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointCorruptError(f"state.pt lacks {', '.join(missing)}")
    if state["step"] != step:
        raise CheckpointCorruptError(f"state.pt is from step {state['step']!r}, not {step}")
    for key in ("epoch", "batch", "bad_epochs", "skipped"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= step:
            raise CheckpointCorruptError(f"state.pt holds {key}={value!r}, not a count from 0 "
                                         f"to its step {step}")
    if not isinstance(state["history"], list) or len(state["history"]) > step or \
            not all(isinstance(row, dict) for row in state["history"]):
        raise CheckpointCorruptError("state.pt's history is not the list of epoch rows a run "
                                     "records")
    return state


def _step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
