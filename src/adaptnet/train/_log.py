"""Where training reports: a ``rich`` progress bar, ``metrics.jsonl`` and TensorBoard events.

The progress bar shows only on an interactive terminal and never under
``CI``; the files are written by rank 0 only, into ``run_dir``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from adaptnet import _rundir
from adaptnet.errors import RunDirError

__all__ = ["RunLog"]


def _step_of(line: str) -> float:
    """A logged row's step; a torn or damaged line (a kill mid-write) counts as never logged."""
    try:
        row = json.loads(line)
    except ValueError:
        return math.inf
    step = row.get("step", 0) if isinstance(row, dict) else math.inf
    return step if isinstance(step, int | float) else math.inf


LINE = ("train/loss", "val/loss", "val/accuracy", "val/perplexity")  # an epoch's line


class RunLog:
    """Progress, JSONL and TensorBoard for one run (a no-op where ``active`` is False)."""

    def __init__(self, run_dir: Path | None, active: bool, show_progress: bool | None,
                 resumed_step: int | None, resumed_rows: int = 0, epochs: int = 0) -> None:
        """``resumed_step``, ``resumed_rows``: where a resumed run's checkpoint stands, and how
        many rows the run had logged when it was written (its history's length).
        ``show_progress`` None: a bar on an interactive terminal (never under ``CI``), a
        line per epoch on stderr elsewhere (a log file, a notebook, CI); False: neither."""
        self.active, self.epochs = active, epochs
        self.jsonl = self.tb = self.progress = None
        if active and run_dir is not None:
            try:
                self._open(run_dir, resumed_step, resumed_rows)
            except OSError as e:
                self.close()
                raise RunDirError(f"cannot write the training log in {run_dir}: "
                                  f"{e.strerror or e} ({type(e).__name__}). Free space or make "
                                  "the run directory writable.") from None
        bar = sys.stderr.isatty() and not os.environ.get("CI") if show_progress is None \
            else show_progress
        self.lines = active and show_progress is None and not bar
        self.progress = None
        if active and bar:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                transient=False)
            self.progress.start()
        self.task = None
        self.started = time.perf_counter()
        self.samples = 0

    def _open(self, run_dir: Path, resumed_step: int | None, resumed_rows: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / _rundir.METRICS
        if resumed_step is not None and path.exists():  # drop what the killed run logged
            kept = [line for line in path.read_text(errors="replace").splitlines()
                    if _step_of(line) <= resumed_step][:resumed_rows]
            path.write_text("".join(line + "\n" for line in kept))
        elif resumed_step is None and path.exists():
            path.unlink()
        self.jsonl = path.open("a")
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

        self.tb = SummaryWriter(str(run_dir / _rundir.TENSORBOARD),
                                purge_step=resumed_step + 1 if resumed_step else None)

    def epoch_start(self, epoch: int, batches: int, done: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=batches, completed=done,
                                               epoch=epoch + 1, loss="-", speed="")

    def step(self, batches_done: int, samples: int, loss: float | None) -> None:
        self.samples += samples
        if self.progress is not None and self.task is not None:
            rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
            fields = {"speed": f"{rate:,.0f} samples/s"}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            self.progress.update(self.task, completed=batches_done, **fields)

    def resumed(self, checkpoint: Path, step: int) -> None:
        """Say where a resumed run picks up (unless progress is off)."""
        if self.lines or self.progress is not None:
            print(f"resumed from {checkpoint} (step {step})", file=sys.stderr, flush=True)

    def record(self, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        if self.lines:  # the headline figures only: a line fits 80 columns
            shown = [f"{k.replace('/', ' ')} {values[k]:.4g}" for k in LINE if k in values]
            print(f"epoch {values['epoch']}/{self.epochs}: {', '.join(shown)} "
                  f"({time.perf_counter() - self.started:.1f} s)", file=sys.stderr, flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
