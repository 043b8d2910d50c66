"""Running recipes: train into a run directory, evaluate a run, compare variants.

A run directory holds ``config.yaml`` (the resolved recipe, written first),
``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``model.safetensors``
(the final weights, ties included), ``results.json`` (test metrics,
parameters, compute, time, per-sample exit/step counts), ``summary.json``
(parameters per module) and ``report.md`` with its PNG plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from adaptnet import sharing
from adaptnet._io import atomic_path, locked_dir, shown
from adaptnet.data import DataSplits, load
from adaptnet.dynamic import DynamicResult
from adaptnet.errors import AdaptnetError, RecipeError, ResumeError, RunDirError
from adaptnet.init import initialize
from adaptnet.models import MODELS, build
from adaptnet.recipes._schema import (
    RECIPES,
    Recipe,
    apply_overrides,
    parse_overrides,
    read_recipe,
    validate_recipe,
)
from adaptnet.recipes._transfer import (
    TransferSpec,
    adapt,
    freeze_for,
    target_args,
    training_plan,
)
from adaptnet.report import write_report
from adaptnet.train import TrainConfig, evaluate, fit
from adaptnet.transfer import load_backbone, replace_head
from adaptnet.transfer._load import run_model_spec

__all__ = [
    "RunResult",
    "compare",
    "evaluate_run",
    "load_recipe",
    "prepare",
    "read_run_config",
    "shipped_recipes",
    "train_recipe",
    "variants",
]

def shipped_recipes() -> dict[str, str]:
    """Shipped recipe names and their one-line descriptions."""
    out = {}
    for f in sorted(RECIPES.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            out[f.name.removesuffix(".yaml")] = str(
                yaml.safe_load(f.read_text(encoding="utf-8")).get("description", ""))
    return out


def load_recipe(name_or_path: str | Path, overrides: list[str] | dict[str, Any] = ()
                ) -> tuple[str, Recipe]:
    """``(name, recipe)`` from a file or a shipped recipe name, overrides applied, validated."""
    p = Path(name_or_path)
    if not p.is_file():
        shipped = RECIPES / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise RecipeError(f"no recipe file {str(name_or_path)!r}, and no shipped recipe of "
                              f"that name; shipped: {', '.join(shipped_recipes())} "
                              "(`adaptnet recipes` describes them).")
        p = Path(str(shipped))
    raw = read_recipe(p)
    if not isinstance(overrides, dict):
        overrides = parse_overrides(list(overrides))
    return p.stem, validate_recipe(apply_overrides(raw, overrides))


def prepare(recipe: Recipe, limit: int | None = None, *, pretrained: Path | None = None
            ) -> tuple[DataSplits, nn.Module, dict[str, Any]]:
    """The dataset, the model (initialised) and the model arguments used (data-derived included).

    For a transfer recipe the model has the backbone's architecture and is
    frozen as its ``mode`` says; its weights come from the backbone run
    ``pretrained`` when given (training), else they are fresh (scratch,
    summaries, or a run's own weights loaded afterwards).
    """
    spec = recipe.transfer
    try:
        data = load(recipe.data.name, **recipe.args("data"))
        if limit is not None:
            data = _limit(data, limit)
        if spec is None:
            args = {**derived_args(recipe.model.name, data, recipe.args("data").get("transform")),
                    **recipe.args("model")}
        else:
            args = target_args(recipe.model.name, recipe.args("model"), spec.backbone,
                               *_backbone_spec(spec, limit), data)
        torch.manual_seed(recipe.seed)
        if spec is not None and spec.mode != "scratch" and pretrained is not None:
            model = load_backbone(pretrained).train()
            replace_head(model, args["num_classes"])
        else:
            model = build(recipe.model.name, **args)
            if recipe.init:
                initialize(model, recipe.init, seed=recipe.seed)
        if spec is not None:
            model = adapt(model, args, data)
            freeze_for(model, spec)
    except AdaptnetError as e:  # problems only the data or the builder can see
        raise RecipeError(f"bad recipe: {e}") from None
    return data, model, args


def _backbone_spec(spec: TransferSpec, limit: int | None) -> tuple[str, dict[str, Any]]:
    """``(builder, arguments)`` of a transfer recipe's backbone, without training it."""
    if Path(spec.backbone).is_dir():
        return run_model_spec(Path(spec.backbone))
    name, recipe = load_recipe(spec.backbone)
    if recipe.transfer is not None:
        raise RecipeError(f"transfer.backbone {name!r} is itself a transfer recipe; train it "
                          "and give its run directory instead.")
    return recipe.model.name, prepare(recipe, limit)[2]


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
    if not (run / "model.safetensors").is_file():
        train_recipe(name, recipe, run, resume=(run / "config.yaml").is_file(), limit=limit)
    return run


def derived_args(model: str, data: DataSplits, transform: str | None) -> dict[str, Any]:
    """Builder arguments the data determines, for those the builder has."""
    shape = data.input_shape[1:] if transform == "pairs" else data.input_shape
    known: dict[str, Any] = {"in_features": math.prod(shape)}
    if data.task == "language_model":
        known |= {"vocab_size": data.num_classes, "max_len": shape[0]}
    elif data.num_classes is not None:
        known["num_classes"] = data.num_classes
    elif data.task == "regression":  # one output per target column
        width = math.prod(data.train.tensors[1].shape[1:])
        known |= {"num_classes": width, "out_features": width}
    if len(shape) == 3:  # images (C, H, W)
        known |= {"in_channels": shape[0], "image_size": shape[-1]}
    if len(shape) == 1:  # signals and sequences (L,)
        known |= {"length": shape[0], "bits": shape[0], "max_len": shape[0]}
    params = inspect.signature(MODELS[model]).parameters
    return {k: v for k, v in known.items() if k in params}


def _limit(data: DataSplits, n: int) -> DataSplits:
    def cut(split: TensorDataset | None) -> TensorDataset | None:
        return None if split is None else TensorDataset(*(t[:n] for t in split.tensors))

    return dataclasses.replace(data, train=cut(data.train), valid=cut(data.valid),
                               test=cut(data.test))


@dataclass
class RunResult:
    """What :func:`train_recipe` measured (also written to ``results.json``)."""

    run_dir: Path
    values: dict[str, Any]


def train_config(recipe: Recipe, data: DataSplits, run_dir: Path, resume: bool) -> TrainConfig:
    metrics = ("loss", "perplexity") if data.task == "language_model" else \
        ("loss", "accuracy") if data.task == "classification" else ("loss",)
    base = {"loss": data.loss, "metrics": metrics, "seed": recipe.seed}
    return TrainConfig(**{**base, **recipe.train, "run_dir": run_dir, "resume": resume})


def train_recipe(name: str, recipe: Recipe, run_dir: Path, *, resume: bool = False,
                 limit: int | None = None) -> RunResult:
    """Train ``recipe`` into ``run_dir``; evaluate on the test split; write results and report.

    The run directory is locked for the whole run. A resume checks first that
    the run's ``config.yaml`` is the recipe given (same model, data, training,
    limit); if not, it refuses and changes nothing.

    Raises:
        RunDirError: ``run_dir`` already holds a run and ``resume`` is False, or
            cannot be written.
        ResumeError: ``resume`` with a recipe that differs from the run's (every
            difference listed), or no usable checkpoint.
        RunLockedError: another process is training into ``run_dir``.
    """
    run_dir = Path(run_dir)
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
    cfg = train_config(recipe, data, run_dir, resume)
    if scale:  # the recipe's own train.lr_scale patterns come first: the first match wins
        extra = {k: v for k, v in scale.items() if k not in cfg.lr_scale}
        cfg = cfg.model_copy(update={"lr_scale": {**cfg.lr_scale, **extra}})
    resolved = recipe.to_dict()
    resolved["model"] = {"name": recipe.model.name, **args}
    config = {"recipe": name, "limit": limit, **resolved}
    with locked_dir(run_dir):
        if (run_dir / "config.yaml").exists():
            if not resume:
                raise RunDirError(f"{run_dir} already holds a run; continue it with --resume, "
                                  "or give another --run-dir (nothing was overwritten).")
            _check_same_run(run_dir, config)
        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        start = time.perf_counter()
        history = fit(model, data.train, val=data.valid, config=cfg,
                      epoch_start=schedule).history
        train_s = time.perf_counter() - start
        sharing.save(model, run_dir / "model.safetensors")
        values = measure(model, data, cfg)
        if backbone is not None:
            values["backbone"] = str(backbone)
        values |= {"recipe": name, "model": recipe.model.name, "dataset": data.name,
                   "samples": data.sizes(), "train_seconds": train_s,
                   "epochs": len(history), "history": history}
        _write_json(run_dir / "results.json", values)
        _write_json(run_dir / "summary.json", sharing.summary(model).to_dict())
        write_report(run_dir)
    return RunResult(run_dir, values)


def _check_same_run(run_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to resume ``run_dir`` with a recipe other than the one it was started with."""
    path = run_dir / "config.yaml"
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunDirError(f"cannot resume {run_dir}: its config.yaml cannot be read "
                          f"({type(e).__name__}); nothing was changed.") from None
    given = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))  # tuples -> lists, as stored
    diffs = _differences(stored, given)
    if diffs:
        listed = "\n".join(f"  {d}" for d in diffs[:20])
        more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        raise ResumeError(f"cannot resume {run_dir}: the recipe given differs from the run's "
                          f"config.yaml ({len(diffs)} difference(s), run -> given):\n{listed}"
                          f"{more}\nNothing was changed. Resume with the run's own recipe and "
                          "overrides, or train the new recipe into another --run-dir.")


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


def measure(model: nn.Module, data: DataSplits, cfg: TrainConfig) -> dict[str, Any]:
    """Test metrics, parameters, executed compute, inference time and exit/step counts."""
    test = evaluate(model, data.test, loss=cfg.loss, metrics=_eval_metrics(cfg))
    s = sharing.summary(model)
    x = data.test.tensors[0][:1024]
    model.eval()
    with torch.no_grad():
        out = model(x)
    stats = out.statistics() if isinstance(out, DynamicResult) else {}
    counts = {name: torch.bincount(stats[name].long().flatten()).tolist()
              for name in ("exit_index", "steps") if name in stats}
    return {"test": test, "params": {"unique": s.unique, "per_use": s.per_use,
                                     "trainable": s.trainable},
            "infer_ms_per_1k": time_inference(model, x), "counts": counts,
            "metric": headline(test)}


def _eval_metrics(cfg: TrainConfig) -> tuple[str, ...]:
    """The training metrics plus the executed multiply-adds per sample."""
    return tuple(dict.fromkeys((*cfg.resolved_metrics(), "macs")))


def headline(test: dict[str, Any]) -> tuple[str, float]:
    """The metric a table shows: accuracy, else perplexity, else loss."""
    for key in ("accuracy", "perplexity", "loss"):
        if key in test:
            return key, float(test[key])
    raise AssertionError("evaluate() always reports loss")


def time_inference(model: nn.Module, x: torch.Tensor, rounds: int = 15, batch: int = 256
                   ) -> float:
    """Median wall time (ms) of batched eval-mode inference, per 1,000 samples."""
    return time_together({"model": model}, x, rounds, batch)["model"]


def time_together(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 15,
                  batch: int = 256) -> dict[str, float]:
    """Median wall time (ms per 1,000 samples) of batched eval-mode inference, side by side.

    Every round runs one pass over ``x`` (in chunks of ``batch``) per model,
    starting from a different model each round, so that the models share the
    machine's state (caches, clocks, other load) and order effects cancel in
    the median; one warm-up pass each first. Timing models in separate runs
    is what made one ratio read 0.40x, 0.81x and 1.18x in three runs.
    """
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    for m in models.values():
        m.eval()
    with torch.no_grad():
        for r in range(rounds + 1):
            for k in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                for chunk in x.split(batch):
                    models[k](chunk)
                if r:  # the first pass warms up
                    times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000.0 * 1000.0 / max(len(x), 1)
            for k, v in times.items()}


def _write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")


def read_run_config(run: Path) -> tuple[str, int | None, Recipe]:
    """``(recipe name, sample limit, recipe)`` from a run's ``config.yaml``.

    Raises:
        RunDirError: ``run`` has no ``config.yaml`` (with what it holds instead).
    """
    config = run / "config.yaml"
    if not config.is_file():
        what = "does not exist" if not run.exists() else \
            f"holds {sorted(p.name for p in run.iterdir())[:6] or 'nothing'}"
        raise RunDirError(f"{run} is not an adaptnet run directory: it has no config.yaml "
                          f"({run} {what}). Give a directory made by `adaptnet train`.")
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as e:
        raise RunDirError(f"{config} cannot be read ({type(e).__name__}); the run directory "
                          "is damaged. Restore config.yaml from a backup.") from None
    if not isinstance(raw, dict):
        raise RunDirError(f"{config} is not a run configuration (a mapping); the run "
                          "directory is damaged.")
    name, limit = raw.pop("recipe", run.name), raw.pop("limit", None)
    try:
        recipe = validate_recipe(raw)
    except RecipeError as e:
        raise RunDirError(f"{config} does not hold a valid recipe: {e}") from None
    return str(name), limit if isinstance(limit, int) and limit > 0 else None, recipe


def load_run(run_dir: str | Path) -> tuple[DataSplits, nn.Module, Recipe]:
    """A finished run's data and trained model (rebuilt from ``config.yaml``), and its recipe.

    Raises:
        RunDirError: ``run_dir`` is not a run directory (no ``config.yaml`` or no
            weights), with what it found instead.
    """
    run = Path(run_dir)
    weights = run / "model.safetensors"
    name, limit, recipe = read_run_config(run)
    if not weights.is_file():
        raise RunDirError(f"{run} has no model.safetensors: its training did not finish. "
                          f"Resume it with `adaptnet train {name} --run-dir {run} --resume`.")
    data, model, _ = prepare(recipe, limit)
    sharing.load(model, weights)
    return data, model, recipe


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict[str, Any]:
    """Rebuild a run's data and model, load its weights, and evaluate ``split``.

    Raises:
        RunDirError: ``run_dir`` is not a run directory (no ``config.yaml`` or no
            weights), with what it found instead.
    """
    run = Path(run_dir)
    name = read_run_config(run)[0]
    data, model, recipe = load_run(run)
    if split not in ("train", "valid", "test") or getattr(data, split) is None:
        raise RunDirError(f"split {split!r} is not available; this run has "
                          f"{[k for k, v in data.sizes().items() if v]}.")
    cfg = train_config(recipe, data, run, False)
    return {"recipe": name, "split": split,
            **evaluate(model, getattr(data, split), loss=cfg.loss, metrics=_eval_metrics(cfg))}


def variants(vary: list[str]) -> dict[str, dict[str, Any]]:
    """The cartesian product of ``key=v1,v2`` options: ``{label: overrides}``."""
    axes = []
    for item in vary:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise RecipeError(f"--vary {item!r} must look like key=v1,v2 (e.g. "
                              "model.tied=true,false).")
        axes.append([(key, parse_overrides([f"{key}={v}"])[key]) for v in values.split(",")])
    return {",".join(f"{k.rsplit('.', 1)[-1]}={json.dumps(x)}" for k, x in combo): dict(combo)
            for combo in itertools.product(*axes)}


def compare(name_or_path: str, plans: dict[str, dict[str, Any]], overrides: list[str],
            out: Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Train each variant (``{label: overrides}``) of a recipe into ``out/<i>-<label>``.

    Every variant is validated before the first one trains. Returns one row of
    results per variant (also written to ``out/compare.json``); their inference
    times come from one side-by-side timing of every variant
    (:func:`time_together`), not from each run's own.
    """
    base = parse_overrides(overrides)
    checked = [(label, v, *load_recipe(name_or_path, {**base, **v}))
               for label, v in plans.items()]
    rows, trained = [], {}
    for i, (label, v, name, recipe) in enumerate(checked):
        slug = f"{i}-" + "".join(c if c.isalnum() else "_" for c in label)[:60]
        res = train_recipe(name, recipe, out / slug, limit=limit)
        metric, value = res.values["metric"]
        rows.append({"variant": label, "overrides": v, "run_dir": str(res.run_dir),
                     "unique_params": res.values["params"]["unique"],
                     "trainable_params": res.values["params"]["trainable"],
                     "per_use_params": res.values["params"]["per_use"],
                     "metric": metric, "value": value,
                     "macs": res.values["test"].get("macs"),
                     "infer_ms_per_1k": res.values["infer_ms_per_1k"],
                     "train_seconds": res.values["train_seconds"]})
        trained[label] = res.run_dir
    if len(rows) > 1:  # time the variants side by side, in the same rounds
        loaded = {label: load_run(run)[:2] for label, run in trained.items()}
        x = next(iter(loaded.values()))[0].test.tensors[0][:1024]
        times = time_together({label: model for label, (_, model) in loaded.items()}, x)
        for row in rows:
            row["infer_ms_per_1k"] = times[row["variant"]]
    _write_json(out / "compare.json", rows)
    return rows
