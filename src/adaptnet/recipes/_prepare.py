"""Preparing a recipe's data and model, and rebuilding a finished run's."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from adaptnet import _rundir, sharing
from adaptnet._io import shown
from adaptnet.data import DataSplits, load_dataset
from adaptnet.errors import AdaptnetError, RecipeError, RunDirError
from adaptnet.init import initialize
from adaptnet.recipes._build import apply_sharing, build_model, builder_of, code_of
from adaptnet.recipes._lookup import load_recipe
from adaptnet.recipes._schema import Recipe, validate_recipe
from adaptnet.recipes._transfer import TransferSpec, adapt, freeze_for, target_args
from adaptnet.recipes._trust import trusting
from adaptnet.transfer import replace_head

__all__ = ["RunRecipe", "derived_args", "load_run", "prepare", "read_run_config"]


def prepare(recipe: Recipe, limit: int | None = None, *, pretrained: Path | None = None,
            trust_code: bool = False) -> tuple[DataSplits, nn.Module, dict[str, Any]]:
    """The dataset, the model (initialised) and the model arguments used (data-derived included).

    For a transfer recipe the model has the backbone's architecture and is
    frozen as its ``mode`` says; its weights come from the backbone run
    ``pretrained`` when given (training), else they are fresh (scratch,
    summaries, or a run's own weights loaded afterwards). ``trust_code``: run
    the code the recipe's ``model.builder`` (and its backbone's) names;
    without it such a recipe is refused (a ``RecipeError`` naming the modules).

    Example:
        >>> from adaptnet.recipes import load_recipe, prepare
        >>> data, model, args = prepare(load_recipe("mnist1d-mlp")[1], limit=64)
        >>> data.sizes(), args["in_features"], args["num_classes"]
        ({'train': 64, 'valid': 0, 'test': 64}, 40, 10)
    """
    with trusting(code_of(recipe) if trust_code else ()):
        return _prepare(recipe, limit, pretrained)


def _prepare(recipe: Recipe, limit: int | None, pretrained: Path | None
             ) -> tuple[DataSplits, nn.Module, dict[str, Any]]:
    spec = recipe.transfer
    try:
        data = load_dataset(recipe.data.name, **recipe.args("data"))
        if limit is not None:
            data = _limit(data, limit)
        if spec is None:
            args = {**derived_args(builder_of(recipe.model), data,
                                   recipe.args("data").get("transform")),
                    **recipe.args("model")}
        else:
            args = target_args(recipe.model.label, recipe.args("model"), spec.backbone,
                               *_backbone_spec(spec, limit), data)
        torch.manual_seed(recipe.seed)
        if spec is not None and spec.mode != "scratch" and pretrained is not None:
            model = load_model(pretrained).train()
            replace_head(model, args["num_classes"])
        else:
            _check_size(recipe, args)
            model = build_model(recipe.model, args)
            apply_sharing(model, recipe)
            if recipe.init:
                initialize(model, recipe.init, seed=recipe.seed)
        if spec is not None:
            model = adapt(model, args, data)
            freeze_for(model, spec)
        _probe(model, data, recipe.model.label, recipe.args("model"))
    except AdaptnetError as e:  # problems only the data or the builder can see
        raise RecipeError(f"bad recipe: {e}") from None
    return data, model, args


def _check_size(recipe: Recipe, args: dict[str, Any]) -> None:
    """Refuse, before allocating it, a model whose weights alone exceed the memory free now.

    The model is built once on the ``meta`` device (shapes, no storage). Every
    zoo model builds there, so a zoo model that fails there fails for its
    arguments (e.g. sizes whose storage overflows 64 bits), at once; a user's
    builder that cannot build there is left to the real build.

    Raises:
        RecipeError: with the parameter count, its size and the memory available.
        ModelError: a zoo model whose arguments cannot make a model.
    """
    try:
        with torch.device("meta"):
            meta = build_model(recipe.model, args)
    except AdaptnetError:
        if recipe.model.name is not None:
            raise
        return
    except Exception:  # a builder of the user's that needs real tensors: no estimate
        return
    tensors = {id(t): t for t in (*meta.parameters(), *meta.buffers())}.values()
    count = sum(t.numel() for t in tensors)
    size = sum(t.numel() * t.element_size() for t in tensors)
    free = available_memory()
    if free is not None and size > free:
        raise RecipeError(
            f"model {recipe.model.label!r} with {shown(recipe.args('model'))} has {count:,} "
            f"parameters ({size / 2**30:.1f} GiB), more than the {free / 2**30:.1f} GiB of "
            "memory free on this machine; make it smaller (its sizes above).")


def available_memory() -> int | None:
    """Bytes of memory free for a new allocation (Linux's MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _probe(model: nn.Module, data: DataSplits, label: str, given: dict[str, Any]) -> None:
    """Run the model once, in eval mode, on two training inputs: a model that does not fit
    the data fails here, naming its arguments, not deep inside training or evaluation.

    Raises:
        RecipeError: the forward pass failed (a shape or type that does not fit).
    """
    x = data.train.tensors[0][:2]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        reason = (str(e).splitlines() or [""])[0][:200]
        raise RecipeError(
            f"model {label!r} with {shown(given) if given else 'its defaults'} does not fit "
            f"{data.name!r}, whose inputs are {tuple(x.shape[1:])}: one forward pass raised "
            f"{type(e).__name__}: {reason}. Check the model arguments the data does not set "
            "(sizes, channels, features per step) and data.transform.") from None
    finally:
        model.train(was)


def _backbone_spec(spec: TransferSpec, limit: int | None) -> tuple[str, dict[str, Any]]:
    """``(builder, arguments)`` of a transfer recipe's backbone, without training it."""
    if Path(spec.backbone).is_dir():
        recipe = read_run_config(Path(spec.backbone))[2]
        return recipe.model.label, recipe.args("model")
    name, recipe = load_recipe(spec.backbone)
    if recipe.transfer is not None:
        raise RecipeError(f"transfer.backbone {name!r} is itself a transfer recipe; train it "
                          "and give its run directory instead.")
    return recipe.model.label, _prepare(recipe, limit, None)[2]


def derived_args(builder: Callable[..., Any], data: DataSplits, transform: str | None
                 ) -> dict[str, Any]:
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
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a callable without a signature (e.g. a C function)
        return {}
    return {k: v for k, v in known.items() if k in params}


def _limit(data: DataSplits, n: int) -> DataSplits:
    def cut(split: TensorDataset | None) -> TensorDataset | None:
        return None if split is None else TensorDataset(*(t[:n] for t in split.tensors))

    return dataclasses.replace(data, train=cut(data.train), valid=cut(data.valid),
                               test=cut(data.test))


class RunRecipe(NamedTuple):
    """A run's ``config.yaml``, its recipe validated."""

    name: str  # the recipe's name
    limit: int | None  # the sample limit the run trained with
    recipe: Recipe


def read_run_config(run: str | Path) -> RunRecipe:
    """``(recipe name, sample limit, recipe)`` from a run's ``config.yaml``, read once.

    Raises:
        RunDirError: ``run`` has no readable ``config.yaml`` (with what it holds
            instead), or it holds no valid recipe.

    Example:
        >>> import tempfile, adaptnet.recipes
        >>> from adaptnet.recipes import load_recipe, read_run_config, train_recipe
        >>> name, recipe = load_recipe("mnist1d-mlp", ["train.epochs=1"])
        >>> run = train_recipe(name, recipe, tempfile.mkdtemp() + "/run", limit=64).run_dir
        >>> config = read_run_config(run)
        >>> isinstance(config, adaptnet.recipes.RunRecipe)
        True
        >>> config.name, config.limit, config.recipe.args("model")["in_features"]
        ('mnist1d-mlp', 64, 40)
    """
    config = _rundir.read_config(run)
    try:
        recipe = validate_recipe(config.body)
    except RecipeError as e:
        raise RunDirError(f"{Path(run) / _rundir.CONFIG} does not hold a valid recipe: "
                          f"{e}") from None
    return RunRecipe(config.recipe, config.limit, recipe)


def load_model(run_dir: str | Path, *, trust_code: bool = False) -> nn.Module:
    """The model a finished run trained, with its weights, in eval mode: the one way from
    a run directory to a model (``transfer`` takes modules and files; a recipe's
    ``transfer.backbone`` run comes through here).

    Built from the arguments its ``config.yaml`` stores, so no dataset is loaded
    (a transfer run, whose model was adapted to its data, is rebuilt as
    :func:`load_run` does). ``trust_code``: as :func:`load_run`'s.

    Raises:
        RunDirError: ``run_dir`` is not a finished run (no ``config.yaml``, no
            weights, or weights that do not match their checksum).
        RecipeError: the run's model is the user's code and ``trust_code`` is False.

    Example:
        >>> import tempfile, adaptnet
        >>> from adaptnet.recipes import load_model, load_recipe, train_recipe
        >>> name, recipe = load_recipe("mnist1d-mlp", ["train.epochs=1"])
        >>> run = train_recipe(name, recipe, tempfile.mkdtemp() + "/run", limit=64).run_dir
        >>> load_model(run)[-1]
        Linear(in_features=100, out_features=10, bias=True)
    """
    config = read_run_config(run_dir)
    if config.recipe.transfer is not None:
        return load_run(run_dir, config, trust_code=trust_code)[1].eval()
    with trusting(code_of(config.recipe) if trust_code else ()):
        model = build_model(config.recipe.model, config.recipe.args("model"))
    apply_sharing(model, config.recipe)
    return sharing.load(model, _rundir.weights(run_dir, config.name)).eval()


def load_run(run_dir: str | Path, config: RunRecipe | None = None, *,
             trust_code: bool = False) -> tuple[DataSplits, nn.Module, Recipe]:
    """A finished run's data and trained model (rebuilt from ``config.yaml``), and its recipe.

    ``config``: the run's configuration when the caller has read it already.
    ``trust_code``: a run whose model came from ``model.builder`` is rebuilt by
    running that code; a run directory is data, so this needs the opt-in.

    Raises:
        RunDirError: ``run_dir`` is not a run directory (no ``config.yaml`` or no
            weights), with what it found instead.
        RecipeError: the run's model is the user's code and ``trust_code`` is False.

    Example:
        >>> import tempfile
        >>> from adaptnet.recipes import load_recipe, load_run, train_recipe
        >>> name, recipe = load_recipe("mnist1d-mlp", ["train.epochs=1"])
        >>> run = train_recipe(name, recipe, tempfile.mkdtemp() + "/run", limit=64).run_dir
        >>> data, model, recipe = load_run(run)
        >>> data.sizes(), model(data.test.tensors[0]).shape
        ({'train': 64, 'valid': 0, 'test': 64}, torch.Size([64, 10]))
    """
    name, limit, recipe = config or read_run_config(run_dir)
    weights = _rundir.weights(run_dir, name)
    data, model, _ = prepare(recipe, limit, trust_code=trust_code)
    sharing.load(model, weights)
    return data, model, recipe
