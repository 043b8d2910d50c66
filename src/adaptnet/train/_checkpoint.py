"""Crash-safe checkpoints: one directory per step, complete or absent.

``<run_dir>/checkpoints/step-000000120/`` holds ``model.safetensors`` (weights
and ties, :func:`adaptnet.save`) and ``state.pt`` (optimizer, scheduler, RNG
and loop position: tensors, numbers and strings only, read back with
``torch.load(weights_only=True)``, which executes no code). Both are written
into a hidden temporary directory, fsynced, and the directory is renamed into
place; older checkpoints are deleted only after that, so a crash at any moment
leaves the previous complete checkpoint. Loading tries the newest first and
falls back, with a warning, past any that cannot be read.
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

from adaptnet._io import atomic_path
from adaptnet.errors import CheckpointError
from adaptnet.sharing import load, save

__all__ = ["checkpoints", "load_latest", "write_checkpoint"]

_NAME = re.compile(r"step-(\d{9})")


def write_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any],
                     keep: int) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep``; return its directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save(model, tmp / "model.safetensors")
        with atomic_path(tmp / "state.pt") as path:
            torch.save(state, path)
        if final.exists():  # the same step again, after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint directories, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def load_latest(run_dir: Path, model: nn.Module) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest readable checkpoint into ``model``; return it and its state, or None."""
    for path in reversed(checkpoints(run_dir)):
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            load(model, path / "model.safetensors")
        except (CheckpointError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
            warnings.warn(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); falling back to the previous one.",
                          RuntimeWarning, stacklevel=3)
            continue
        return path, state
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
