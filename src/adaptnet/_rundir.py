"""The run directory's format: the one place that names its files and reads and writes them.

A run directory holds ``config.yaml`` (the recipe's name, the sample limit
and the resolved recipe, model arguments filled in; written first),
``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``model.safetensors``
(the final weights, ties included), ``results.json`` (test metrics,
parameters, compute, time, per-sample exit/step counts), ``summary.json``
(parameters per module) and ``report.md`` with its PNG plots. ``recipes``
writes runs; ``recipes``, ``report``, ``transfer`` and ``cli`` read them
through this module, so each damage is reported one way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaptnet._io import atomic_path, refuse_links, sha256_file
from adaptnet.errors import RunDirError

__all__ = ["CHECKPOINTS", "CHECKPOINT_MANIFEST", "CHECKPOINT_STATE", "CONFIG", "METRICS",
           "PLOTS", "REPORT", "RESULTS", "SUMMARY", "TENSORBOARD", "WEIGHTS", "WEIGHTS_SHA256",
           "RunConfig", "read_config", "read_json", "weights", "write_config", "write_json"]

# Every name in a run directory (its lock, .lock, is _io.locked_dir's, on any directory)
CONFIG, WEIGHTS, RESULTS, SUMMARY = "config.yaml", "model.safetensors", "results.json", \
    "summary.json"
METRICS, TENSORBOARD, REPORT, PLOTS = "metrics.jsonl", "tensorboard", "report.md", "plots"
CHECKPOINTS = "checkpoints"  # checkpoints/step-NNNNNNNNN/: the weights (WEIGHTS), the state
CHECKPOINT_STATE, CHECKPOINT_MANIFEST = "state.pt", "checkpoint.json"  # and their checksums


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


WEIGHTS_SHA256 = "weights_sha256"  # the results.json key holding the final weights' checksum


def weights(run: str | Path, name: str | None = None) -> Path:
    """The run's final weights file, verified against the checksum ``results.json`` records.

    Raises:
        RunDirError: there is none (the training did not finish), or it does not
            match its checksum (damaged or replaced).
    """
    path = Path(run) / WEIGHTS
    if not path.is_file():
        resume = f"`adaptnet train {name} --run-dir {run} --resume`" if name else \
            "`adaptnet train ... --resume`"
        raise RunDirError(f"{run} has no {WEIGHTS}: its training did not finish. Finish it "
                          f"with {resume}.")
    results = read_json(run) if (Path(run) / RESULTS).is_file() else {}
    recorded = results.get(WEIGHTS_SHA256) if isinstance(results, dict) else None
    if recorded is not None and recorded != sha256_file(path):
        raise RunDirError(f"{path} does not match the checksum {RESULTS} records for it: it "
                          "is damaged or was replaced. Restore it from a backup, or train the "
                          "run again.")
    return path


def read_json(run: str | Path, name: str = RESULTS) -> Any:
    """``results.json`` (or another JSON file of the run).

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
