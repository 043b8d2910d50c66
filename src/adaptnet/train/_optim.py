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
    with ``frozen=True``, for a schedule that unfreezes them), ``lr_scale`` applied."""
    rules = {pattern: {"lr": cfg.lr * factor} for pattern, factor in cfg.lr_scale.items()}
    groups = param_groups(model, weight_decay=cfg.weight_decay, rules=rules, frozen=frozen)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError("fit(): the model has no trainable parameter; unfreeze some "
                          "(adaptnet.unfreeze) or check requires_grad.")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
                               momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig
                    ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The configured schedule (stepped once per optimizer step), after linear warmup."""
    sched = torch.optim.lr_scheduler
    main = None
    if cfg.scheduler is not None:
        try:
            _probe(getattr(sched, cfg.scheduler), optimizer, cfg.scheduler_args)
            main = getattr(sched, cfg.scheduler)(optimizer, **cfg.scheduler_args)
        except (TypeError, ValueError, ArithmeticError, IndexError, KeyError) as e:
            raise ConfigError(f"bad training configuration:\n  scheduler_args: "
                              f"{cfg.scheduler}({shown(cfg.scheduler_args)}) failed: "
                              f"{type(e).__name__}: {shown(str(e), 200)}") from None
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
