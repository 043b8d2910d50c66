"""The run directory's format: the one place that names its files and reads and writes them.

A run directory holds ``config.yaml`` (the recipe's name, the sample limit
and the resolved recipe, model arguments filled in; written first),
``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``model.safetensors``
(the final weights, ties included), ``results.json`` (test metrics,
parameters, compute, time, per-sample exit/step counts), ``summary.json``
(parameters per module), ``report.md`` with its PNG plots, and ``.lock`` while a
process trains into it. Each file has a typed record here (:class:`RunConfig`,
:class:`RunResults`, :class:`CheckpointManifest`) and is read and written only
here. ``recipes`` and ``train`` write runs; ``recipes``, ``report`` and ``cli``
read them through this module, so each damage is reported one way.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from adaptnet._io import atomic_path, refuse_links, sha256_file
from adaptnet.errors import CheckpointCorruptError, RunDirError, RunLockedError

__all__ = [
    "CHECKPOINTS",
    "CHECKPOINT_MANIFEST",
    "CHECKPOINT_STATE",
    "CONFIG",
    "LOCK",
    "METRICS",
    "PLOTS",
    "REPORT",
    "RESULTS",
    "SUMMARY",
    "TENSORBOARD",
    "WEIGHTS",
    "CheckpointManifest",
    "RunConfig",
    "RunResults",
    "locked",
    "read_config",
    "read_json",
    "read_manifest",
    "read_results",
    "weights",
    "write_config",
    "write_json",
    "write_manifest",
    "write_results",
]

# Every name in a run directory
LOCK = ".lock"  # held by locked() while a process trains into the run
CONFIG, WEIGHTS, RESULTS, SUMMARY = "config.yaml", "model.safetensors", "results.json", \
    "summary.json"
METRICS, TENSORBOARD, REPORT, PLOTS = "metrics.jsonl", "tensorboard", "report.md", "plots"
CHECKPOINTS = "checkpoints"  # checkpoints/step-NNNNNNNNN/: the weights (WEIGHTS), the state
CHECKPOINT_STATE, CHECKPOINT_MANIFEST = "state.pt", "checkpoint.json"  # and their checksums


_HELD: dict[str, list] = {}  # real path -> [lock file descriptor, holders in this process]


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the run directory ``path``'s exclusive OS lock (``flock``), creating it if missing.

    The lock lives on ``path/.lock`` (:data:`LOCK`), which records the holder's
    process id. It is re-entrant within one process (a recipe run holds it for the
    whole run; ``fit`` inside counts one more holder, not a second OS lock) and
    released by the OS when the process dies, so a killed run never leaves a stale
    lock.

    Raises:
        RunDirError: ``path`` is a file, cannot be created or written, or holds
            a symbolic link (:func:`refuse_links`).
        RunLockedError: another process holds the lock.
    """
    import fcntl  # POSIX only, like the rest of the run-directory format

    path = Path(path)
    key = os.path.realpath(path)
    held = _HELD.get(key)
    if held is None and path.is_dir():
        refuse_links(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if held is None:  # a link made since the check is not followed either
            fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot use {str(path)!r} as a run directory: {e.strerror or e} "
                          f"({type(e).__name__}). Give a directory you can write to."
                          ) from None
    if held is not None:
        held[1] += 1
        try:
            yield path
        finally:
            held[1] -= 1
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(f"{path} is in use: another process (pid {owner}) is training "
                             "into it. Wait for it to finish, or give another run directory."
                             ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield path
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock


@dataclass(frozen=True)
class RunConfig:
    """A run's ``config.yaml``.

    Attributes:
        recipe: the recipe's name (a shipped name or the file's stem).
        limit: the sample limit the run trained with, or None.
        body: the resolved recipe (``data``, ``model`` with every argument,
            ``train``, ...), as :func:`adaptnet.recipes.validate_recipe` reads it.
        extended: the run's extensions, oldest first: ``{"epochs": [from, to]}``
            each (``adaptnet train --resume --extend``).
    """

    recipe: str
    limit: int | None
    body: dict[str, Any] = field(default_factory=dict)
    extended: tuple[dict[str, Any], ...] = ()

    @property
    def model(self) -> dict[str, Any]:
        """The ``model:`` section: ``name`` or ``builder``, and the builder's arguments."""
        model = self.body.get("model")
        return model if isinstance(model, dict) else {}


def read_config(run: str | Path) -> RunConfig:
    """The run's ``config.yaml``.

    Raises:
        RunDirError: no ``config.yaml`` (saying what the directory holds
            instead), one that cannot be read or is not a mapping, or a
            directory holding symbolic links.
    """
    run = Path(run)
    path = run / CONFIG
    if run.is_dir():
        refuse_links(run)
    if not path.is_file():
        what = "does not exist" if not run.exists() else \
            f"holds {sorted(p.name for p in run.iterdir())[:6] or 'nothing'}" if run.is_dir() \
            else "is a file"
        raise RunDirError(f"{run} is not an adaptnet run directory: it has no {CONFIG} "
                          f"({run} {what}). Give a directory made by `adaptnet train`.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as e:
        raise RunDirError(f"{path} cannot be read ({type(e).__name__}); the run directory "
                          f"is damaged. Restore {CONFIG} from a backup.") from None
    if not isinstance(raw, dict):
        raise RunDirError(f"{path} is not a run configuration (a mapping); the run "
                          "directory is damaged.")
    name, limit = raw.pop("recipe", run.name), raw.pop("limit", None)
    extended = raw.pop("extended", [])
    if not isinstance(extended, list) or not all(isinstance(e, dict) for e in extended):
        raise RunDirError(f"{path}: 'extended' is not the list of extensions a run records; "
                          "the run directory is damaged.")
    return RunConfig(str(name), limit if isinstance(limit, int) and limit > 0 else None, raw,
                     tuple(extended))


def write_config(run: str | Path, config: RunConfig) -> None:
    """Write ``config.yaml`` atomically (recipe name and limit first, then the recipe)."""
    with atomic_path(Path(run) / CONFIG) as tmp:
        head = {"recipe": config.recipe, "limit": config.limit}
        if config.extended:
            head["extended"] = list(config.extended)
        tmp.write_text(yaml.safe_dump({**head, **config.body}, sort_keys=False))


class RunResults(BaseModel):
    """A finished run's ``results.json``: what :func:`adaptnet.recipes.train_recipe` measured.

    Attributes:
        recipe, model, dataset: the recipe's name, the model's label, the dataset's.
        samples: samples per split (``train``, ``valid``, ``test``).
        train_seconds, epochs: the training's wall time and epochs.
        history: one row of metrics per epoch, as ``fit`` logged them.
        test: the test split's metrics (``evaluate``'s: loss, accuracy, macs, ...).
        params: ``unique``, ``per_use`` and ``trainable`` parameter counts.
        infer_ms_per_1k: median eval-mode inference time per 1,000 test samples.
        counts: histograms of whole counts per sample (``exit_index``, ``steps``) or
            per token (``depth``).
        metric: the headline metric and its value (accuracy, else perplexity, else loss).
        weights_sha256: the final weights' SHA-256 (None: a run from before checksums).
        decode: a Hugging Face model's greedy decoding against its base model, or None.
        backbone: the pretrained backbone's run directory (transfer recipes), or None.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    recipe: str
    model: str
    dataset: str
    samples: dict[str, int]
    train_seconds: float
    epochs: int
    history: list[dict[str, Any]]
    test: dict[str, Any]
    params: dict[str, int]
    infer_ms_per_1k: float
    counts: dict[str, list[int]]
    metric: tuple[str, float]
    weights_sha256: str | None = None
    decode: dict[str, float] | None = None
    backbone: str | None = None


def write_results(run: str | Path, results: RunResults) -> None:
    """Write ``results.json`` atomically."""
    write_json(Path(run) / RESULTS, results.model_dump(exclude_none=True))


def read_results(run: str | Path) -> RunResults:
    """The run's ``results.json``.

    Raises:
        RunDirError: missing (the training did not finish), unreadable, or not
            what a run records (naming the first field that is not).
    """
    raw = read_json(run, RESULTS)
    try:
        return RunResults.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the file"
        raise RunDirError(f"{Path(run) / RESULTS} is not what a run records ({where}: "
                          f"{err['msg']}); the run directory is damaged. Train the run "
                          "again, or restore it from a backup.") from None


def weights(run: str | Path, name: str | None = None) -> Path:
    """The run's final weights file, verified against the checksum ``results.json`` records.

    Raises:
        RunDirError: there is none (the training did not finish), it does not
            match its checksum (damaged or replaced), or ``results.json`` is
            damaged.
    """
    path = Path(run) / WEIGHTS
    if not path.is_file():
        resume = f"`adaptnet train {name} --run-dir {run} --resume`" if name else \
            "`adaptnet train ... --resume`"
        raise RunDirError(f"{run} has no {WEIGHTS}: its training did not finish. Finish it "
                          f"with {resume}.")
    recorded = read_results(run).weights_sha256 if (Path(run) / RESULTS).is_file() else None
    if recorded is not None and recorded != sha256_file(path):
        raise RunDirError(f"{path} does not match the checksum {RESULTS} records for it: it "
                          "is damaged or was replaced. Restore it from a backup, or train the "
                          "run again.")
    return path


@dataclass(frozen=True)
class CheckpointManifest:
    """A checkpoint's ``checkpoint.json``: its step and the SHA-256 of each of its files."""

    step: int
    sha256: dict[str, str]
    format: int = 2


def write_manifest(checkpoint: Path, manifest: CheckpointManifest) -> None:
    """Write ``checkpoint.json`` into the checkpoint directory, atomically."""
    write_json(checkpoint / CHECKPOINT_MANIFEST, {"format": manifest.format,
                                                  "step": manifest.step,
                                                  "sha256": manifest.sha256})


def read_manifest(checkpoint: Path) -> CheckpointManifest | None:
    """The checkpoint's ``checkpoint.json``; None when it has none (an older adaptnet's).

    Raises:
        CheckpointCorruptError: a file that is not a manifest.
    """
    path = checkpoint / CHECKPOINT_MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        step, sums = raw["step"], raw["sha256"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{CHECKPOINT_MANIFEST} is malformed "
                                     f"({type(e).__name__}: {e})") from None
    if isinstance(step, bool) or not isinstance(step, int) or not isinstance(sums, dict) or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise CheckpointCorruptError(f"{CHECKPOINT_MANIFEST} is malformed (step {step!r}, "
                                     f"sha256 {type(sums).__name__})")
    return CheckpointManifest(step, sums, raw.get("format", 2))


def read_json(run: str | Path, name: str) -> Any:
    """A JSON file of the run (``summary.json``; ``results.json`` is :func:`read_results`'s).

    Raises:
        RunDirError: the file is missing or damaged.
    """
    path = Path(run) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{run} has no {name}: its training did not finish.") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{path} cannot be read ({type(e).__name__}); the run directory "
                          "is damaged.") from None


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
