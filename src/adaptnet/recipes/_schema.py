"""Recipes: a YAML file naming a dataset, a zoo model, init rules and training; validated up front.

Validation reports every problem at once, each with its path in the recipe
(``model.hidden: ...``), before any data is loaded or tensor allocated:
unknown keys, wrong types (builder and dataset arguments are checked
against their signatures), unknown names, and impossible combinations.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from adaptnet._io import short, shown
from adaptnet._shipped import RECIPES
from adaptnet.data import DATASETS, TRANSFORMS
from adaptnet.errors import InitError, RecipeError
from adaptnet.init import parse_scheme
from adaptnet.models import MODELS
from adaptnet.recipes._hf import RECIPE_MODELS
from adaptnet.recipes._transfer import TransferSpec
from adaptnet.recipes._trust import check_builder_path, import_builder, trusted
from adaptnet.train import TrainConfig

__all__ = ["RECIPES", "RUN_ONLY", "Recipe", "apply_overrides", "parse_overrides", "read_recipe",
           "validate_recipe"]


RUN_ONLY = ("run_dir", "resume")  # set by the command line, not the recipe
_CLASSES = {"cross_entropy": ("classification", "language_model"),
            "mse": ("regression", "autoencode"), "bce_with_logits": ("regression", "autoencode")}


class Named(BaseModel):
    """``name`` plus the builder's or dataset's keyword arguments (checked separately)."""

    model_config = ConfigDict(extra="allow")
    name: str


class ModelSpec(BaseModel):
    """``name`` of a zoo builder, or ``builder: "package.module:function"`` of your own, plus
    its keyword arguments (checked against its signature)."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    builder: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelSpec:
        if (self.name is None) == (self.builder is None):
            raise ValueError("give exactly one of name (a zoo model) and builder "
                             "('package.module:function', your own)")
        return self

    @property
    def label(self) -> str:
        """The zoo name or the builder path."""
        return self.name if self.name is not None else str(self.builder)


class TieTarget(BaseModel):
    """The long form of a ``ties:`` entry: ``member: {owner: ..., transform: transpose}``."""

    model_config = ConfigDict(extra="forbid")
    owner: str
    transform: Literal["transpose"] | None = None


class ShareSpec(BaseModel):
    """One ``share:`` entry: the arguments of :func:`adaptnet.share`."""

    model_config = ConfigDict(extra="forbid")
    modules: str | list[str]
    owner: str | None = None
    blocks: int = Field(1, ge=1, le=2**31)
    strategy: Literal["all", "cycle", "sequence", "cycle_rev"] = "all"


class Recipe(BaseModel):
    """A validated recipe.

    Attributes:
        description: one line, shown by ``adaptnet recipes``.
        seed: seeds data order, initialisation and dropout.
        data: ``name`` (or a path) and the dataset's options (``transform``
            included).
        model: ``name`` of a zoo builder, or ``builder: "package.module:function"``
            (your own code, imported as Python imports it, the current directory
            first), and its arguments; arguments left out that the data
            determines (``num_classes``, ``in_features``, ``vocab_size``, ...)
            are filled in from the dataset when the builder takes them.
        ties: ``{member: owner}`` or ``{member: {owner: ..., transform:
            transpose}}``, tied with :func:`adaptnet.tie` after the builder.
        share: one or a list of ``{modules, owner, blocks, strategy}``, applied
            with :func:`adaptnet.share` after the builder (and after ``ties``).
            ``ties=off`` / ``share=off`` (an override) drops the section and
            ``=on`` keeps it: ``--vary ties=on,off`` compares a model with and
            without its ties.
        init: ordered ``{selector: scheme}`` rules for :func:`adaptnet.initialize`,
            applied once the ties and sharing are in place.
        train: :class:`adaptnet.TrainConfig` fields (not ``run_dir``/``resume``).
        transfer: start from a pretrained backbone (see :class:`TransferSpec`).
    """

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**32)
    data: Named
    model: ModelSpec
    ties: dict[str, str | TieTarget] = Field(default_factory=dict)
    share: list[ShareSpec] = Field(default_factory=list)
    init: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    transfer: TransferSpec | None = None

    @field_validator("share", mode="before")
    @classmethod
    def _share_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    def args(self, section: str) -> dict[str, Any]:
        """The keyword arguments of ``data`` or ``model`` (everything but ``name``/``builder``)."""
        return dict(getattr(self, section).model_extra or {})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


MAX_VALUES = 10_000  # a recipe is small: more values, after YAML aliases, is an attack or a mistake
MAX_DEPTH = 20


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a YAML recipe file (validated later, with the overrides applied).

    Raises:
        RecipeError: unreadable, not UTF-8, not YAML, not a mapping, nested
            deeper than ``MAX_DEPTH`` or holding more than ``MAX_VALUES`` values
            once YAML aliases are expanded.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe {p}: {e.strerror}.") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {p} is not UTF-8 text (byte {e.start}); save it as "
                          "UTF-8.") from None
    raw = _yaml(text, f"recipe {p}")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {p} must be a mapping (data:, model:, train: ...), got "
                          f"{type(raw).__name__}.")
    return raw


_NOT_YAML = object()


def _yaml(text: str, what: str, not_yaml: Any = _NOT_YAML) -> Any:
    """``yaml.safe_load`` whose every failure is a RecipeError, and bounded in size and depth.

    Text that is not YAML at all is ``not_yaml`` when given, else an error.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if not_yaml is not _NOT_YAML:
            return not_yaml
        raise RecipeError(f"{what} is not valid YAML: {short(str(e), 300)}") from None
    except (ValueError, RecursionError) as e:  # int digits over Python's limit; deep nesting
        raise RecipeError(f"{what} cannot be read: {type(e).__name__}: "
                          f"{short(str(e), 200)}.") from None
    _check_size(value, what)
    return value


def _check_size(value: Any, what: str) -> None:
    """Refuse alias bombs and deep nesting without expanding them (shared nodes counted once
    per reference, iteratively)."""
    counted = 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        counted += 1
        if counted > MAX_VALUES:
            raise RecipeError(f"{what} holds more than {MAX_VALUES:,} values (YAML aliases "
                              "expanded); a recipe is a few dozen settings.")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{what} is nested more than {MAX_DEPTH} levels deep.")
        if isinstance(node, dict):
            stack += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.001", "model.tied=false"]`` to ``{"train.lr": 0.001, "model.tied": False}``.

    Values are read as YAML scalars or flow collections (``0.1``, ``true``,
    ``null``, ``[1, 2]``); anything else stays a string.

    Example:
        >>> from adaptnet.recipes import parse_overrides
        >>> parse_overrides(["train.lr=0.01", "model.capacity=null", "data.name=digits"])
        {'train.lr': 0.01, 'model.capacity': None, 'data.name': 'digits'}
    """
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {item!r} must look like key=value with a dotted key, "
                              "e.g. train.lr=0.001 or model.hidden=128.")
        # A value that is not YAML stays a plain string.
        out[key] = _yaml(value, f"override {short(item)!r}", not_yaml=value) if value else ""
    return out


SWITCHED = ("ties", "share")  # sections an override turns on (kept) or off (dropped)


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each dotted key set (intermediate mappings created).

    ``ties`` and ``share`` set to a boolean switch their section: on keeps it
    as the recipe has it, off drops it.
    """
    result = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        if key in SWITCHED and isinstance(value, bool):
            if not value:
                result.pop(key, None)
            elif not result.get(key):
                raise RecipeError(f"override {key}=on: the recipe has no {key}: section to "
                                  f"switch on; write one (see docs/recipes.md).")
            continue
        node = result
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {key}: {'.'.join(parts[:i + 1])} is "
                                  f"{node!r}, not a section.")
        node[parts[-1]] = value
    return result


_STAND_IN = "\0absent"  # a missing or broken required section, while the rest is checked


def validate_recipe(raw: Mapping[str, Any]) -> Recipe:
    """Check a raw recipe; every problem is listed with its path in one ``RecipeError``.

    Example:
        >>> from adaptnet.recipes import validate_recipe
        >>> recipe = validate_recipe({"data": {"name": "digits"}, "model": {"name": "mlp",
        ...     "hidden": 8}})
        >>> recipe.model.label, recipe.args("model")
        ('mlp', {'hidden': 8})
    """
    problems: list[str] = []
    raw = dict(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems += [_line(err) for err in e.errors()]
        # Drop the top-level keys at fault and check the rest, so that every problem is
        # reported in one pass (an unknown key does not hide a bad model argument).
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
        retry = {k: v for k, v in raw.items() if k not in bad}
        for key in ("data", "model"):  # required: a stand-in, so the rest is still checked
            if key not in retry:
                retry[key] = {"name": _STAND_IN}
        try:
            recipe = Recipe.model_validate(retry)
        except ValidationError:
            _raise(problems)
    data_args, model_args = recipe.args("data"), recipe.args("model")
    transform = data_args.pop("transform", None)
    if transform is not None and transform not in TRANSFORMS:
        problems.append(f"data.transform: unknown transform {transform!r}; expected one of "
                        f"{', '.join(TRANSFORMS)}.")
    dataset = recipe.data.name
    if dataset == _STAND_IN:
        pass  # data: reported above
    elif dataset in DATASETS:
        problems += check_args("data", DATASETS[dataset], data_args)
    elif not Path(dataset).suffix and not Path(dataset).is_dir():
        problems.append(f"data.name: unknown dataset {dataset!r}{_close(dataset, DATASETS)}; "
                        f"built in: {', '.join(DATASETS)}, or a .csv/.npz file or image folder.")
    if recipe.model.builder is not None:
        # The user's module is imported only when trusted; untrusted, its arguments are
        # checked when it is built (under trust), and reading the recipe runs nothing.
        try:
            check_builder_path(recipe.model.builder)
            if trusted(recipe.model.builder):
                problems += check_args("model", import_builder(recipe.model.builder),
                                        model_args)
        except RecipeError as e:
            problems.append(str(e))
    elif recipe.model.name in MODELS:
        problems += check_args("model", MODELS[recipe.model.name], model_args)
    elif recipe.model.name in RECIPE_MODELS:
        problems += check_args("model", RECIPE_MODELS[recipe.model.name], model_args)
    elif recipe.model.name != _STAND_IN:  # model: reported above
        problems.append(f"model.name: unknown model {recipe.model.name!r}"
                        f"{_close(str(recipe.model.name), MODELS)}; `adaptnet models` lists "
                        "the zoo, or give builder: 'package.module:function'.")
    if recipe.transfer is not None and (recipe.ties or recipe.share):
        problems.append("ties/share: a transfer recipe's model is its backbone, which brings "
                        "its own ties; tie and share in the backbone's recipe instead.")
    for key in RUN_ONLY:
        if key in recipe.train:
            problems.append(f"train.{key}: set by the command line (--run-dir, --resume), not "
                            "the recipe.")
    try:  # the command line gives run_dir (checkpoint_every needs one)
        TrainConfig(**{k: v for k, v in recipe.train.items() if k not in RUN_ONLY},
                    run_dir=Path("run"))
    except ValidationError as e:
        problems += ["train." + _line(err, TrainConfig.model_fields) for err in e.errors()]
    for selector, scheme in recipe.init.items():
        try:
            parse_scheme(scheme)
        except InitError as e:
            problems.append(f"init.{selector}: {e}")
    if recipe.transfer is not None:
        backbone = recipe.transfer.backbone
        if not (Path(backbone).exists() or (RECIPES / f"{backbone}.yaml").is_file()):
            problems.append(f"transfer.backbone: {backbone!r} is neither a run directory, a "
                            "recipe file nor a shipped recipe.")
    loss = recipe.train.get("loss")
    task = "autoencode" if transform == "autoencode" else \
        "classification" if transform == "pairs" else \
        None if dataset == _STAND_IN else _task(dataset)
    if isinstance(loss, str) and loss in _CLASSES and task and task not in _CLASSES[loss]:
        problems.append(f"train.loss: {loss!r} does not fit {dataset!r}, a {task} dataset; "
                        f"leave it out to use the dataset's loss.")
    _raise(problems)
    return recipe


def _task(dataset: str) -> str | None:
    return {"shakespeare": "language_model", "regression": "regression"}.get(
        dataset, "classification" if dataset in DATASETS else None)


def check_args(section: str, fn: Callable, args: dict[str, Any]) -> list[str]:
    """Unknown or mistyped keyword arguments of ``fn``, one problem line each."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a user builder's annotations may not resolve: check names only
        hints = {}
    try:
        signature = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    params = {k: p for k, p in signature.items()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k != "path"}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in signature.values())
    problems = []
    for key in args:
        if key not in params and not open_ended:
            problems.append(f"{section}.{key}: unknown argument{_close(key, params)}; "
                            f"{fn.__name__} accepts {', '.join(params)}.")
    for key, value in args.items():
        p = params.get(key)
        if p is None or isinstance(value, bool):
            continue
        seed = key == "seed" or key.endswith("_seed")  # 0 is a seed like any other
        low, high = (0, 2**64 - 1) if seed else (1, 2**31)
        if hints.get(key) is int and isinstance(p.default, int) and p.default >= 1 and \
                isinstance(value, int) and not low <= value <= high:
            what = "a seed, an int from 0 to 2**64 - 1" if seed else \
                "a positive int (a size or count) up to 2**31"
            problems.append(f"{section}.{key}: must be {what}, got {shown(value)}; the "
                            f"default is {p.default}.")
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{section}.{key}: must be a finite number, got {value}.")
    fields = {k: (hints.get(k, Any), p.default if p.default is not p.empty else ...)
              for k, p in params.items() if k in args}
    try:
        create_model(f"{fn.__name__}_args", __config__=ConfigDict(strict=False),
                     **fields).model_validate({k: v for k, v in args.items() if k in params})
    except ValidationError as e:
        problems += [f"{section}." + _line(err, params) for err in e.errors()]
    return problems


def _line(err: Any, fields: Any = Recipe.model_fields) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "recipe"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _close(where.rsplit(".", 1)[-1], fields) + "."
    elif err["type"] == "missing":
        msg = "required"
    elif "input" in err and err["type"] != "value_error":
        msg += f" (got {shown(err['input'])})"
    return f"{where}: {msg}"


def _close(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _raise(problems: list[str]) -> None:
    if problems:
        raise RecipeError(f"bad recipe ({len(problems)} problem"
                          f"{'s' if len(problems) > 1 else ''}):\n"
                          + "\n".join(f"  {p}" for p in problems))
