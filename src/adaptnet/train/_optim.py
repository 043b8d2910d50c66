"""Optimizers and learning-rate schedules from a :class:`TrainConfig`."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from adaptnet._io import shown
from adaptnet.errors import ConfigError
from adaptnet.sharing import param_groups
from adaptnet.train._config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: nn.Module, cfg: TrainConfig, *, frozen: bool = False
                    ) -> torch.optim.Optimizer:
    """The configured optimizer over the model's unique trainable tensors (frozen ones too
    with ``frozen=True``, for a schedule that unfreezes them), ``lr_scale`` applied.

    An optimizer given already built is used as it is, once checked to hold
    only the model's tensors.
    """
    if isinstance(cfg.optimizer, torch.optim.Optimizer):
        return _checked(cfg.optimizer, model)
    named = isinstance(cfg.optimizer, str)
    rules = {pattern: {"lr": cfg.lr * factor} for pattern, factor in cfg.lr_scale.items()}
    # A class or factory keeps its own weight_decay unless one is configured: mark the
    # decayed groups (1.0) and leave the key out of them.
    marked = not named and not cfg.weight_decay
    groups = param_groups(model, weight_decay=1.0 if marked else cfg.weight_decay,
                          no_decay=cfg.no_decay, rules=rules, frozen=frozen)
    if marked:
        for g in groups:
            if g["weight_decay"] == 1.0:
                del g["weight_decay"]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError("fit(): the model has no trainable parameter; unfreeze some "
                          "(adaptnet.unfreeze) or check requires_grad.")
    extra = cfg.optimizer_args
    try:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, **extra)
        if cfg.optimizer in ("adam", "adamw"):
            cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
            return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)
        if cfg.optimizer == "rmsprop":
            return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
                                       momentum=cfg.momentum, **extra)
        if isinstance(cfg.optimizer, type):
            built = cfg.optimizer(groups, lr=cfg.lr, **extra)
        else:
            built = cfg.optimizer(groups)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad training configuration:\n  optimizer: "
                          f"{shown(cfg.optimizer)} could not be built: {type(e).__name__}: "
                          f"{shown(str(e), 200)}") from None
    if not isinstance(built, torch.optim.Optimizer):
        raise ConfigError(f"fit(): the optimizer factory returned {type(built).__name__}; it "
                          "must return a torch.optim.Optimizer built over the groups it is "
                          "given.")
    return _checked(built, model)


def _checked(opt: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """``opt``, once every tensor it holds is the model's, each once."""
    ours = {id(p) for p in model.parameters()}
    held = [p for g in opt.param_groups for p in g["params"]]
    foreign = sum(id(p) not in ours for p in held)
    if foreign:
        raise ConfigError(f"fit(): the optimizer holds {foreign} tensor(s) that are not the "
                          "model's parameters; build it over model.parameters() (or the "
                          "groups a factory is given), after any tie or share.")
    return opt


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig
                    ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The configured schedule (stepped once per optimizer step), after linear warmup."""
    sched = torch.optim.lr_scheduler
    main = None
    if isinstance(cfg.scheduler, sched.LRScheduler):
        if cfg.scheduler.optimizer is not optimizer:
            raise ConfigError("fit(): the scheduler belongs to another optimizer than the one "
                              "fit() trains with; build it over that optimizer (optimizer=opt).")
        return cfg.scheduler
    if cfg.scheduler is not None:
        named = isinstance(cfg.scheduler, str)
        cls = getattr(sched, cfg.scheduler) if named else cfg.scheduler
        try:
            if named or isinstance(cls, type):
                _probe(cls, optimizer, cfg.scheduler_args)
                main = cls(optimizer, **cfg.scheduler_args)
            else:
                main = cls(optimizer)
        except (TypeError, ValueError, ArithmeticError, IndexError, KeyError) as e:
            what = f"scheduler_args: {cfg.scheduler}" if named else \
                f"scheduler: {shown(cfg.scheduler)}"
            raise ConfigError(f"bad training configuration:\n  {what}"
                              f"({shown(cfg.scheduler_args)}) failed: "
                              f"{type(e).__name__}: {shown(str(e), 200)}") from None
        if not isinstance(main, sched.LRScheduler):
            raise ConfigError(f"fit(): the scheduler factory returned {type(main).__name__}; "
                              "it must return a torch.optim.lr_scheduler.LRScheduler of the "
                              "optimizer it is given.")
    if not cfg.warmup_steps:
        return main
    warmup = sched.LinearLR(optimizer, start_factor=1 / (cfg.warmup_steps + 1), end_factor=1.0,
                            total_iters=cfg.warmup_steps)
    if main is None:
        return warmup
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_steps])


def _probe(cls: type, optimizer: torch.optim.Optimizer, args: dict) -> None:
    """Build the schedule on a stand-in optimizer and step it a few times.

    Some arguments fail only when the schedule steps (``CosineAnnealingLR``
    with ``T_max=0`` divides by zero), which would be mid-training.
    """
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")}
              for g in optimizer.param_groups]
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], **g}
                                for g in groups], lr=groups[0]["lr"])
    schedule = cls(stand_in, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(3):
            stand_in.step()
            schedule.step()
