"""The training configuration, validated before anything runs; every problem reported at once."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adaptnet._io import shown
from adaptnet.errors import ConfigError

__all__ = ["LOSSES", "OPTIMIZERS", "TrainConfig", "config_from"]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
LOSSES = ("mse", "cross_entropy", "bce_with_logits")
METRICS = ("loss", "accuracy", "perplexity", "steps", "macs", "exits")
_BIG = 2**31  # counts beyond this overflow torch's index arithmetic


def _schedulers() -> list[str]:
    mod = torch.optim.lr_scheduler
    return sorted(n for n in dir(mod) if not n.startswith("_") and isinstance(getattr(mod, n), type)
                  and issubclass(getattr(mod, n), mod.LRScheduler) and n not in
                  ("LRScheduler", "SequentialLR", "ChainedScheduler", "LambdaLR",
                   "MultiplicativeLR", "ReduceLROnPlateau"))


def _one_of(value: Any, choices: list[str] | tuple[str, ...], what: str) -> Any:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {what} {shown(value)}; expected one of "
                         f"{', '.join(choices)}.{hint}")
    return value


class TrainConfig(BaseModel):
    """Everything :func:`adaptnet.fit` needs besides the model and the data.

    ``optimizer`` is one of the names ``sgd``, ``adam``, ``adamw``,
    ``rmsprop`` (whose options apply where the optimizer has them:
    ``momentum`` and ``nesterov`` for SGD, ``momentum`` and ``alpha`` for
    RMSprop, ``betas`` for Adam/AdamW); a ``torch.optim.Optimizer`` class,
    built as ``cls(groups, lr=lr, **optimizer_args)``; a factory called with
    the parameter groups (``lambda groups: torch.optim.NAdam(groups, lr=3e-3)``);
    or an optimizer already built over the model's parameters, used as it is.
    ``optimizer_args`` go to a name or a class. The groups hold each tensor
    once (:func:`adaptnet.param_groups`): ``no_decay`` lists the glob patterns
    of tensors never decayed (default: every bias and every normalisation
    layer; ``[]`` decays everything, as ``torch.optim.SGD(model.parameters(),
    weight_decay=...)`` does). With ``weight_decay`` 0, a class or factory
    keeps its own ``weight_decay`` for the decayed groups.
    ``lr_scale`` maps parameter patterns to learning-rate factors
    (``{"features": 0.1}``: a pretrained backbone learns 10x slower); the first
    pattern matching a tensor wins. ``scheduler`` names a class of
    ``torch.optim.lr_scheduler`` built with ``scheduler_args``, or is such a
    class, a factory ``optimizer -> scheduler``, or a scheduler of the
    optimizer given; it and ``warmup_steps`` (linear warmup, not with a
    scheduler object) step once per optimizer step. ``batch_keys`` names
    the inputs and targets of mapping batches (``("image", "label")``).
    ``strategy`` is how ``torchrun`` training is distributed: ``"ddp"``
    (DistributedDataParallel) or ``"fsdp"`` (FSDP2 through
    :func:`adaptnet.shard`, ties kept whole).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    optimizer: Any = "sgd"
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    lr: float = 0.01
    lr_scale: dict[str, float] = Field(default_factory=dict)
    momentum: float = Field(0.0, ge=0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    alpha: float = Field(0.99, gt=0, le=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    no_decay: tuple[str, ...] | None = None
    l1: float = Field(0.0, ge=0)
    clip_grad_norm: float | None = Field(None, gt=0)
    scheduler: Any = None
    scheduler_args: dict[str, Any] = Field(default_factory=dict)
    warmup_steps: int = Field(0, ge=0, le=_BIG)
    epochs: int = Field(1, ge=1, le=_BIG)
    batch_size: int = Field(32, ge=1, le=_BIG)
    drop_last: bool = False
    batch_keys: tuple[str, str] | None = None
    loss: str = "mse"
    metrics: tuple[str, ...] | None = None
    early_stopping: int | None = Field(None, ge=1, le=_BIG)
    nonfinite: Literal["stop", "skip"] = "stop"
    seed: int = Field(0, ge=0, lt=2**32)
    deterministic: bool = True
    device: str = "cpu"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    run_dir: Path | None = None
    checkpoint_every: int | None = Field(None, ge=1, le=_BIG)
    keep_checkpoints: int = Field(2, ge=1, le=_BIG)
    resume: bool = False
    resume_unverified: bool = False
    print_every: int | None = Field(None, ge=1, le=_BIG)
    progress: bool | None = None

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v: Any) -> Any:
        if isinstance(v, str):
            return _one_of(v.lower(), OPTIMIZERS, "optimizer")
        if isinstance(v, torch.optim.Optimizer) or callable(v):
            return v  # an optimizer, a torch.optim class, or a factory
        raise ValueError(f"expected a name ({', '.join(OPTIMIZERS)}), a torch.optim class, a "
                         f"factory params -> Optimizer, or an optimizer; got {shown(v)}.")

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not 0 < v < math.inf:
            raise ValueError(f"the learning rate must be positive and finite, got {v}; e.g. "
                             "lr=0.01.")
        return v

    @field_validator("momentum", "alpha", "eps", "weight_decay", "l1", "clip_grad_norm")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}.")
        return v

    @field_validator("lr_scale")
    @classmethod
    def _lr_scale(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: f for k, f in v.items() if not f > 0}
        if bad:
            raise ValueError(f"learning-rate factors must be positive, got {bad}; e.g. "
                             "lr_scale={'features': 0.1}.")
        return v

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        return _one_of(v, LOSSES, "loss")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for m in v or ():
            _one_of(m, METRICS, "metric")
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            return _one_of(v, _schedulers(), "scheduler")
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
        if isinstance(v, plateau) or v is plateau:
            raise ValueError("ReduceLROnPlateau steps on a metric, and fit() steps the "
                             "schedule once per optimizer step without one; use a schedule "
                             "such as CosineAnnealingLR, or early_stopping.")
        if isinstance(v, torch.optim.lr_scheduler.LRScheduler) or callable(v):
            return v  # a scheduler, an LRScheduler class, or a factory
        raise ValueError(f"expected a name of torch.optim.lr_scheduler, an LRScheduler class, "
                         f"a factory optimizer -> scheduler, or a scheduler; got {shown(v)}.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            device = torch.device(v)
        except RuntimeError:
            raise ValueError(f"unknown device {v!r}; e.g. 'cpu' or 'cuda'.") from None
        if device.type == "cuda" and (not torch.cuda.is_available() or (
                device.index is not None and device.index >= torch.cuda.device_count())):
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"device {v!r} is not available here ({have} CUDA device(s)); "
                             "use device='cpu'.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {v!r} is not available here (no Apple MPS); use "
                             "device='cpu'.")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {v!r}: fit() trains on 'cpu', 'cuda' or 'mps'.")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):  # names only
            raise ValueError("nesterov=True needs optimizer='sgd' and momentum > 0, got "
                             f"optimizer={self.optimizer!r}, momentum={self.momentum}.")
        if self.resume and self.run_dir is None:
            raise ValueError("resume=True needs run_dir, the directory holding the checkpoints.")
        if self.resume_unverified and not self.resume:
            raise ValueError("resume_unverified=True goes with resume=True: it lets a resume "
                             "use a checkpoint without checksums (written by an older "
                             "adaptnet).")
        if self.checkpoint_every and self.run_dir is None:
            raise ValueError("checkpoint_every needs run_dir, where checkpoints are written.")
        if self.scheduler_args and not isinstance(self.scheduler, str | type):
            raise ValueError("scheduler_args go to a scheduler name or class, got "
                             f"scheduler={shown(self.scheduler)}; name one, e.g. "
                             "scheduler='StepLR', or give the factory its arguments.")
        if self.optimizer_args and not isinstance(self.optimizer, str | type):
            raise ValueError("optimizer_args go to an optimizer name or class, got "
                             f"optimizer={shown(self.optimizer)}; give a factory or an "
                             "optimizer its arguments itself.")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler) and \
                self.warmup_steps:
            raise ValueError("warmup_steps needs a scheduler fit() builds (a name, a class or a "
                             "factory); a scheduler already built cannot be preceded by one.")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler) and \
                not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError("a scheduler object belongs to an optimizer; pass that optimizer "
                             "too (optimizer=opt), or pass the scheduler's class or a "
                             "factory optimizer -> scheduler.")
        return self

    def resolved_metrics(self) -> tuple[str, ...]:
        if self.metrics is not None:
            return self.metrics
        return ("loss", "accuracy") if self.loss == "cross_entropy" else ("loss",)


def config_from(config: TrainConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]
                ) -> TrainConfig:
    """A validated config from a config object or mapping plus keyword overrides.

    Example:
        >>> from adaptnet.train import config_from
        >>> config_from({"epochs": 3}, {"lr": 0.01}).lr, config_from(None, {"epochs": 2}).epochs
        (0.01, 2)
    """
    if isinstance(config, TrainConfig):
        base = config.model_dump()
    elif config is None:
        base = {}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"fit(): config must be a TrainConfig or a mapping, got "
                          f"{type(config).__name__}.")
    merged = {**base, **overrides}
    if merged.get("scheduler") and "optimizer" in merged and merged["optimizer"] is None:
        raise ConfigError(f"bad training configuration:\n  scheduler: {merged['scheduler']!r} "
                          "needs an optimizer, but optimizer is None; name one of "
                          f"{', '.join(OPTIMIZERS)}.")
    try:
        return TrainConfig(**merged)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(where, list(TrainConfig.model_fields), n=1)
                msg = "unknown option" + (f"; did you mean {close[0]!r}?" if close else ".")
            elif "input" in err and err["type"] not in ("value_error",):
                msg += f" (got {shown(err['input'])})"
            lines.append(f"  {where}: {msg}")
        raise ConfigError("bad training configuration:\n" + "\n".join(lines)) from None
