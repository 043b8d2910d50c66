"""Running recipes: train into a run directory, evaluate a run.

The run directory's format is :mod:`adaptnet._rundir`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adaptnet import _rundir, sharing
from adaptnet._io import sha256_file, shown
from adaptnet._renamed import warn_renamed
from adaptnet.data import DataSplits
from adaptnet.errors import RecipeError, ResumeError, RunDirError
from adaptnet.recipes._build import code_of
from adaptnet.recipes._lookup import load_recipe
from adaptnet.recipes._measure import eval_metrics, measure
from adaptnet.recipes._prepare import load_run, prepare, read_run_config
from adaptnet.recipes._schema import Recipe
from adaptnet.recipes._transfer import TransferSpec, training_plan
from adaptnet.recipes._trust import trusting
from adaptnet.report import write_report
from adaptnet.train import TrainConfig, evaluate, fit

__all__ = ["RunResult", "evaluate_run", "pretrain", "train_config", "train_recipe"]


@dataclass
class RunResult:
    """A trained run: its directory and what :func:`train_recipe` measured (its
    ``results.json``)."""

    run_dir: Path
    results: _rundir.RunResults

    @property
    def values(self) -> dict[str, Any]:
        """Deprecated: ``results`` as the dict adaptnet 0.1 returned."""
        warn_renamed("recipes.RunResult.values", "recipes.RunResult.results", stacklevel=3)
        return self.results.model_dump(exclude_none=True)


def train_config(recipe: Recipe, data: DataSplits, run_dir: Path, resume: bool,
                 resume_unverified: bool = False) -> TrainConfig:
    metrics = ("loss", "perplexity") if data.task == "language_model" else \
        ("loss", "accuracy") if data.task == "classification" else ("loss",)
    base = {"loss": data.loss, "metrics": metrics, "seed": recipe.seed}
    return TrainConfig(**{**base, **recipe.train, "run_dir": run_dir, "resume": resume,
                          "resume_unverified": resume_unverified})


def train_recipe(name: str, recipe: Recipe, run_dir: Path, *, resume: bool = False,
                 limit: int | None = None, trust_code: bool = False,
                 resume_unverified: bool = False, extend: bool = False) -> RunResult:
    """Train ``recipe`` into ``run_dir``; evaluate on the test split; write results and report.

    The run directory is locked for the whole run. A resume checks first that
    the run's ``config.yaml`` is the recipe given (same model, data, training,
    limit); if not, it refuses and changes nothing. ``resume_unverified``: a
    resume may use checkpoints without checksums (an older format). ``extend``
    (with ``resume``): the recipe may raise ``train.epochs`` above the run's, to
    train a finished run longer; the extension is recorded in ``config.yaml``
    and every other difference still refuses. The scheduler goes on from its
    saved state (a schedule that ended at the old length does not stretch).

    Raises:
        RunDirError: ``run_dir`` already holds a run and ``resume`` is False, or
            cannot be written.
        ResumeError: ``resume`` with a recipe that differs from the run's (every
            difference listed), or no usable checkpoint.
        RunLockedError: another process is training into ``run_dir``.
        RecipeError: the recipe's ``model.builder`` (or its backbone's) names code
            and ``trust_code`` is False.

    Example:
        >>> import tempfile
        >>> from adaptnet.recipes import load_recipe, train_recipe
        >>> name, recipe = load_recipe("mnist1d-mlp", ["train.epochs=1"])
        >>> run = train_recipe(name, recipe, tempfile.mkdtemp() + "/run", limit=64)
        >>> run.results.epochs, run.results.metric[0], (run.run_dir / "report.md").is_file()
        (1, 'accuracy', True)
    """
    if extend and not resume:
        raise ResumeError("extend=True (--extend) lengthens a run being resumed; give "
                          "resume=True (--resume) too.")
    with trusting(code_of(recipe) if trust_code else ()):
        return _train(name, recipe, Path(run_dir), resume, limit, resume_unverified, extend)


def _train(name: str, recipe: Recipe, run_dir: Path, resume: bool, limit: int | None,
           resume_unverified: bool = False, extend: bool = False) -> RunResult:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {str(run_dir)!r} is a file, not a directory; give a "
                          "directory (it is created if missing).")
    spec = recipe.transfer
    backbone = None
    if spec is not None and spec.mode != "scratch":
        backbone = pretrain(spec, run_dir.parent, limit).resolve()
        recipe = recipe.model_copy(update={"transfer": spec.model_copy(
            update={"backbone": str(backbone)})})
    data, model, args = prepare(recipe, limit, pretrained=backbone)
    schedule, scale = training_plan(model, spec) if spec is not None else (None, {})
    cfg = train_config(recipe, data, run_dir, resume, resume_unverified)
    if scale:  # the recipe's own train.lr_scale patterns come first: the first match wins
        extra = {k: v for k, v in scale.items() if k not in cfg.lr_scale}
        cfg = cfg.model_copy(update={"lr_scale": {**cfg.lr_scale, **extra}})
    resolved = recipe.to_dict()
    resolved["model"] = {**recipe.model.model_dump(include={"name", "builder"},
                                                   exclude_none=True), **args}
    config = _rundir.RunConfig(name, limit, resolved)
    with _rundir.locked(run_dir):
        if (run_dir / _rundir.CONFIG).exists():
            if not resume:
                raise RunDirError(f"{run_dir} already holds a run; continue it with --resume, "
                                  "or give another --run-dir (nothing was overwritten).")
            config = _check_same_run(run_dir, config, extend)
        elif extend:
            raise ResumeError(f"cannot extend {run_dir}: it holds no run to extend.")
        _rundir.write_config(run_dir, config)
        start = time.perf_counter()
        history = fit(model, data.train, val=data.valid, config=cfg,
                      epoch_start=schedule).history
        train_s = time.perf_counter() - start
        sharing.save(model, run_dir / _rundir.WEIGHTS)
        results = _rundir.RunResults(
            **measure(model, data, cfg), recipe=name, model=recipe.model.label,
            dataset=data.name, samples=data.sizes(), train_seconds=train_s,
            epochs=len(history), history=history,
            weights_sha256=sha256_file(run_dir / _rundir.WEIGHTS),
            backbone=None if backbone is None else str(backbone))
        _rundir.write_results(run_dir, results)
        _rundir.write_json(run_dir / _rundir.SUMMARY, sharing.summary(model).to_dict())
        write_report(run_dir)
    return RunResult(run_dir, results)


def pretrain(spec: TransferSpec, runs: Path, limit: int | None) -> Path:
    """The backbone's run directory; a backbone recipe is trained first, once.

    A recipe trains into ``runs/backbones/<recipe>-<hash of the recipe and
    limit>``, and a finished run there is reused (an unfinished one resumed),
    so the variants of ``adaptnet compare`` share one pretraining.
    """
    if Path(spec.backbone).is_dir():
        return Path(spec.backbone)
    name, recipe = load_recipe(spec.backbone)
    if recipe.transfer is not None:
        raise RecipeError(f"transfer.backbone {name!r} is itself a transfer recipe; train it "
                          "and give its run directory instead.")
    key = hashlib.sha256(json.dumps([recipe.to_dict(), limit], sort_keys=True).encode())
    run = runs / "backbones" / f"{name}-{key.hexdigest()[:10]}"
    if not (run / _rundir.WEIGHTS).is_file():
        train_recipe(name, recipe, run, resume=(run / _rundir.CONFIG).is_file(), limit=limit)
    return run


def _check_same_run(run_dir: Path, config: _rundir.RunConfig, extend: bool = False
                    ) -> _rundir.RunConfig:
    """Refuse to resume ``run_dir`` with a recipe other than the one it was started with;
    return the configuration to write. ``extend``: ``train.epochs`` may grow (recorded in
    ``extended``); every other difference still refuses."""
    try:
        stored = _rundir.read_config(run_dir)
    except RunDirError as e:
        raise RunDirError(f"cannot resume {run_dir}: {e} Nothing was changed.") from None

    def flat(c: _rundir.RunConfig) -> Any:  # tuples -> lists, as stored
        return yaml.safe_load(yaml.safe_dump({"recipe": c.recipe, "limit": c.limit, **c.body},
                                             sort_keys=False))

    diffs = _differences(flat(stored), flat(config))
    extended = stored.extended
    if extend:
        before = stored.body.get("train", {}).get("epochs", 1)
        after = config.body.get("train", {}).get("epochs", 1)
        if not (isinstance(before, int) and isinstance(after, int) and after > before):
            raise ResumeError(f"cannot extend {run_dir}: --extend lengthens a run; give "
                              f"train.epochs above the run's {before!r} (got {after!r}). "
                              "Nothing was changed.")
        diffs = [d for d in diffs if not d.startswith("train.epochs:")]
        extended = (*extended, {"epochs": [before, after]})
    if diffs:
        listed = "\n".join(f"  {d}" for d in diffs[:20])
        more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        raise ResumeError(f"cannot resume {run_dir}: the recipe given differs from the run's "
                          f"config.yaml ({len(diffs)} difference(s), run -> given):\n{listed}"
                          f"{more}\nNothing was changed. Resume with the run's own recipe and "
                          "overrides (--extend may raise train.epochs), or train the new "
                          "recipe into another --run-dir.")
    return dataclasses.replace(config, extended=extended)


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """``key: old -> new`` for each leaf where the nested mappings ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b])
                for d in _differences(a.get(k, _ABSENT), b.get(k, _ABSENT),
                                      f"{path}.{k}" if path else str(k))]
    if a == b:
        return []
    return [f"{path or 'config'}: {_ABSENT if a is _ABSENT else shown(a)} -> "
            f"{_ABSENT if b is _ABSENT else shown(b)}"]


_ABSENT = "(absent)"


def evaluate_run(run_dir: str | Path, split: str = "test", *, trust_code: bool = False
                 ) -> dict[str, Any]:
    """Rebuild a run's data and model, load its weights, and evaluate ``split``.

    ``trust_code``: as :func:`load_run`'s (a run of the user's own model).

    Raises:
        RunDirError: ``run_dir`` is not a run directory (no ``config.yaml`` or no
            weights), with what it found instead.
        RecipeError: the run's model is the user's code and ``trust_code`` is False.

    Example:
        >>> import tempfile
        >>> from adaptnet.recipes import evaluate_run, load_recipe, train_recipe
        >>> name, recipe = load_recipe("mnist1d-mlp", ["train.epochs=1"])
        >>> run = train_recipe(name, recipe, tempfile.mkdtemp() + "/run", limit=64)
        >>> values = evaluate_run(run.run_dir)
        >>> sorted(values), values["accuracy"] == run.results.test["accuracy"]
        (['accuracy', 'loss', 'macs', 'recipe', 'split'], True)
    """
    run = Path(run_dir)
    config = read_run_config(run)
    data, model, recipe = load_run(run, config, trust_code=trust_code)
    name = config.name
    if split not in ("train", "valid", "test") or getattr(data, split) is None:
        raise RunDirError(f"split {split!r} is not available; this run has "
                          f"{[k for k, v in data.sizes().items() if v]}.")
    cfg = train_config(recipe, data, run, False)
    return {"recipe": name, "split": split,
            **evaluate(model, getattr(data, split), loss=cfg.loss, metrics=eval_metrics(cfg))}

