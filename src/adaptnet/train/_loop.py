"""The training loop: ``fit`` and ``evaluate``.

One step: forward; the task loss and auxiliary loss of the result, read
through the ``DynamicResult`` protocol (``task_loss``: BranchyNet's joint loss
for early exits, PonderNet's expected loss; ``aux_loss``); backward; the L1
gradient; a finiteness check of the loss and of one sum per gradient (or the
clipping norm); optimizer and scheduler steps. The loss value the check reads
also feeds the running loss, kept in Python; other
metrics accumulate in tensors, read once per epoch.

Determinism: the data order of epoch ``e`` is a permutation drawn from a
generator seeded with ``(seed, e)``, so a run resumed from a checkpoint sees
the same batches; with the model, optimizer, scheduler and RNG states restored,
it continues bit for bit (on CPU, with ``deterministic=True``).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaptnet import _rundir
from adaptnet.errors import ConfigError, NonFiniteError, ResumeError, RunDirError
from adaptnet.sharing import param_groups, save
from adaptnet.train._checkpoint import (
    checkpoints,
    load_latest,
    optimizer_state,
    restore_optimizer,
    write_checkpoint,
)
from adaptnet.train._config import TrainConfig, config_from
from adaptnet.train._data import Batches, Indexed, Source, source
from adaptnet.train._evaluate import run_evaluation
from adaptnet.train._log import RunLog
from adaptnet.train._losses import LOSSES, LossFn, statistic, unpack
from adaptnet.train._optim import build_optimizer, build_scheduler
from adaptnet.train._shard import forget_unused, is_sharded, shard

__all__ = ["FitResult", "fit"]
_WIDE = (torch.float32, torch.float64)  # summed as they are; narrower floats in float32


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch: ``epoch``, ``step``, ``lr``, ``train/<metric>``
            and ``val/<metric>`` values.
        steps: optimizer steps taken (including skipped ones).
        skipped: steps skipped for a non-finite loss or gradient (``nonfinite="skip"``).
        stopped_early: whether early stopping ended the run.
        checkpoint: the last checkpoint written, if any.
        resumed_from: the checkpoint the run resumed from, if any.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    skipped: int = 0
    stopped_early: bool = False
    checkpoint: Path | None = None
    resumed_from: Path | None = None


def fit(model: nn.Module, train: Any, *, val: Any = None, loss_fn: LossFn | None = None,
        config: TrainConfig | Mapping[str, Any] | None = None,
        epoch_start: Callable[[int], Any] | None = None, **options: Any) -> FitResult:
    """Train ``model`` on ``train``; return the per-epoch history.

    Args:
        model: any ``nn.Module``; it may return a tensor, or a ``DepthResult``,
            ``MoEResult`` or ``ExitResult``, whose auxiliary losses are added.
        train: ``(inputs, targets)`` tensors, a ``TensorDataset`` or any map-style
            dataset of ``(input, target)`` pairs (adaptnet draws the order and
            batches by ``batch_size``); or a ``DataLoader``, an
            ``IterableDataset`` or any re-iterable of ``(inputs, targets)``
            batches (the loader's own order and batches; mapping batches are
            read through ``batch_keys``). A one-shot iterator (a generator)
            serves ``epochs=1`` only.
        val: evaluation data of the same kinds, evaluated after every epoch.
        loss_fn: a ``(prediction, target) -> scalar`` function replacing
            ``config.loss``.
        config: a :class:`TrainConfig` or a mapping of its fields.
        epoch_start: called with the 0-based epoch before each epoch (and
            again for the epoch a resumed run continues), e.g. an
            :class:`adaptnet.transfer.GradualUnfreeze` schedule. The optimizer
            then also holds the frozen tensors, so it may unfreeze them; it
            must depend on the epoch only, so that a resumed run repeats it.
        **options: :class:`TrainConfig` fields, overriding ``config``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) training is data parallel with
    ``DistributedDataParallel`` (or FSDP2 with ``strategy="fsdp"``, through
    :func:`adaptnet.shard`): each optimizer step uses a global batch of
    ``batch_size * world_size`` samples split evenly across ranks; rank 0 logs
    and writes checkpoints. A ``DataLoader`` must then have a
    ``DistributedSampler``; fit calls its ``set_epoch`` before each epoch.

    The optimizer is a name, a ``torch.optim`` class, a factory ``params ->
    Optimizer`` or an optimizer already built over the model's parameters;
    the scheduler a name, an ``LRScheduler`` class, a factory ``optimizer ->
    scheduler`` or a scheduler of that optimizer (see :class:`TrainConfig`).

    Raises:
        ConfigError: invalid configuration or data, every problem listed;
            ``epoch_start`` under ``torchrun`` (DDP only syncs the tensors
            trainable when it starts).
        NonFiniteError: a NaN/Inf loss or gradient with ``nonfinite="stop"``; the
            weights and buffers are those before the failing step, and the last
            good checkpoint is kept.
        ResumeError: ``resume=True`` and the run has checkpoints, none of which
            passes its checksums or fits the model; or ``run_dir`` holds a run
            but no checkpoint to continue from.
        RunDirError: ``run_dir`` already holds a run and ``resume`` is False.
        RunLockedError: another process is training into ``run_dir``.

    With ``run_dir``, the directory is locked (``run_dir/.lock``) for the whole
    call; checkpoints are checksummed and verified on resume.

    Example:
        >>> import torch, torch.nn as nn, adaptnet
        >>> x, y = torch.randn(64, 10), torch.randn(64, 1)
        >>> net = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))
        >>> result = adaptnet.fit(net, (x, y), optimizer="adam", lr=1e-2, epochs=5)
        >>> result.history[-1]["train/loss"] < result.history[0]["train/loss"]
        True
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fit(): model must be an nn.Module, got {type(model).__name__}.")
    for name, fn in (("loss_fn", loss_fn), ("epoch_start", epoch_start)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"fit(): {name} must be a function, got {type(fn).__name__}.")
    return _Trainer(model, config_from(config, options), loss_fn, epoch_start).run(train, val)


class _Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, loss_fn: LossFn | None,
                 epoch_start: Callable[[int], Any] | None = None) -> None:
        self.model, self.cfg, self.epoch_start = model, cfg, epoch_start
        self.fn = loss_fn or LOSSES[cfg.loss]
        self.metrics = cfg.resolved_metrics()
        self.accuracy, self.steps = "accuracy" in self.metrics, "steps" in self.metrics
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(cfg.device)
        if epoch_start is not None and self.world > 1:
            raise ConfigError("fit(): epoch_start (e.g. gradual unfreezing) is not supported "
                              f"under torchrun (WORLD_SIZE={self.world}): DDP only syncs the "
                              "tensors that are trainable when it starts. Train the stages "
                              "as separate fit() calls instead.")

    def run(self, train: Any, val: Any) -> FitResult:
        cfg = self.cfg
        keys, epochs = cfg.batch_keys, cfg.epochs
        data = source(train, "train", keys=keys, batch_size=cfg.batch_size, reads=epochs,
                      caller="fit()")
        val_data = None if val is None else source(val, "val", keys=keys, reads=epochs,
                                                   batch_size=cfg.batch_size, caller="fit()")
        if self.world > 1:
            for what, d in (("train", data), ("val", val_data)):
                if isinstance(d, Batches) and not d.distributed():
                    raise ConfigError(
                        f"fit(): under torchrun (WORLD_SIZE={self.world}) {what} is a "
                        f"{type(d.data).__name__} without a DistributedSampler, so every "
                        "rank would train on the same batches. Build the DataLoader with "
                        "sampler=torch.utils.data.DistributedSampler(dataset), or pass the "
                        "tensors or the Dataset and let fit() split each batch.")
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        lock = _rundir.locked(cfg.run_dir) if cfg.run_dir is not None and self.rank == 0 else \
            contextlib.nullcontext()
        try:
            with lock:  # one process writes a run directory at a time
                return self._run(data, val_data)
        finally:
            torch.use_deterministic_algorithms(deterministic)

    def _run(self, data: Source, val: Source | None) -> FitResult:
        cfg, model = self.cfg, self.model
        self._setup()
        result = FitResult()
        pos = {"epoch": 0, "batch": 0, "step": 0, "best": math.inf, "bad_epochs": 0,
               "order": None}
        acc = torch.zeros(4, dtype=torch.float64)  # loss sum, samples, correct, depth sum
        torch.manual_seed(cfg.seed)
        if cfg.run_dir is not None:  # every rank, as every rank reads the checkpoints,
            self._check_run_dir()  # and all before rank 0 writes anything there
            if self.world > 1:
                dist.barrier()
        if cfg.resume:
            found = load_latest(cfg.run_dir, model, cfg.resume_unverified)
            if found is not None:
                result.resumed_from, state = found
                self._restore(state, pos, result)
                acc = state["acc"].clone() if self.rank == 0 else torch.zeros_like(acc)
                # the checkpoint holds every rank's sums: rank 0 carries them on
        self.net = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=True) if self.world > 1 and not self.fsdp else model
        # find_unused_parameters: a dynamic model may leave a path unused on one rank in a
        # step; DDP then reduces zeros for it instead of waiting for a gradient forever.
        log = RunLog(cfg.run_dir, self.rank == 0, cfg.progress,
                     pos["step"] if result.resumed_from else None, len(result.history),
                     cfg.epochs)
        if result.resumed_from:
            log.resumed(result.resumed_from, pos["step"])
        try:
            self.slots = acc.unbind()  # views: one add_ per metric per step, no indexing
            self._epochs(data, val, pos, acc, result, log)
        finally:
            log.close()
        result.steps = pos["step"]
        return result

    def _check_run_dir(self) -> None:
        """Never train over a run: without ``resume`` the run directory must hold none; with
        it, a directory that holds one must hold a checkpoint to continue from.

        Raises:
            RunDirError: a run is there and ``resume`` is False.
            ResumeError: ``resume`` found no checkpoint in a directory that holds a run.
        """
        run = Path(self.cfg.run_dir)
        if (run / _rundir.CHECKPOINTS).exists() and not (run / _rundir.CHECKPOINTS).is_dir():
            raise RunDirError(f"{run / _rundir.CHECKPOINTS} is a file, where fit() writes its "
                              "checkpoints; move it away, or give another run_dir.")
        traces = [name for name in (_rundir.METRICS, _rundir.TENSORBOARD, _rundir.WEIGHTS,
                                    _rundir.RESULTS) if (run / name).exists()]
        if not traces:
            return
        if not self.cfg.resume:
            raise RunDirError(
                f"{run} already holds a run ({', '.join(traces)}); fit() never trains over one. "
                "Continue it with resume=True, or give another run_dir.")
        if not checkpoints(run):
            raise ResumeError(
                f"cannot resume {run}: it holds a run ({', '.join(traces)}) but no checkpoint "
                "to continue from (checkpoints/ is missing or empty). Nothing was changed; "
                "to train again from the start, give another run_dir.")

    def _setup(self) -> None:
        """Process group, device, optimizer, schedule, and the tensors the step works on."""
        cfg, model = self.cfg, self.model
        if self.world > 1 and not dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local)
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            # The group outlives fit (a sharded model is saved with collectives), so it is
            # torn down at exit, while the interpreter is still whole: left to finalization,
            # gloo's worker threads can abort the process (SIGABRT) after training succeeded.
            atexit.register(_destroy_group)
        model.to(self.device)
        self.fsdp = cfg.strategy == "fsdp" and self.world > 1
        if self.fsdp and not is_sharded(model):
            shard(model)
        schedule = self.epoch_start is not None
        self.opt = build_optimizer(model, cfg, frozen=schedule)
        self.sched = build_scheduler(self.opt, cfg)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.names = {id(p): n for n, p in model.named_parameters()}
        self._watch_buffers()
        self.l1 = [p for g in param_groups(model, weight_decay=1.0, frozen=schedule)
                   if g["weight_decay"] for p in g["params"]] if cfg.l1 else []
        self.loss_total, self.samples = 0.0, 0  # summed per step in Python: no tensor op

    def _watch_buffers(self) -> None:
        """Buffers a forward pass may change (BatchNorm statistics), and room to save them.

        A step whose loss or gradient is not finite puts them back, so that
        ``nonfinite="skip"`` and ``"stop"`` leave no NaN in running statistics.
        """
        unique = {id(b): b for m in self.model.modules() for name, b in m._buffers.items()
                  if b is not None and b.numel() and name not in m._non_persistent_buffers_set}
        self.buffers = list(unique.values())  # persistent ones: masks and caches are not state
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def _epochs(self, data: Source, val: Source | None, pos: dict, acc: torch.Tensor,
                result: FitResult, log: RunLog) -> None:
        cfg = self.cfg
        per_step = cfg.batch_size * self.world
        for epoch in range(pos["epoch"], cfg.epochs):
            start = pos["batch"] if epoch == pos["epoch"] else 0
            if isinstance(data, Indexed):
                total: int | None = data.length(per_step, cfg.drop_last)
                batches = data.epoch(epoch, cfg.seed, per_step, cfg.drop_last, start,
                                     self.world, self.rank, self.device)
            else:  # the order a resumed epoch was drawn from, or the current one's
                total = data.length()
                order = pos["order"] if start else None
                pos["order"] = order or data.state()
                batches = data.epoch(epoch, start, order, self.device)
            log.epoch_start(epoch, total, start)
            if self.epoch_start is not None:
                self.epoch_start(epoch)
                self._watch_buffers()  # a schedule may swap modules (e.g. FrozenBatchNorm)
            self.model.train()
            every = max(1, (total or 0) // 50)
            b = start
            for b, (x, y) in enumerate(batches, start + 1):
                loss = self._step(x, y, pos, result)
                pos["step"] += 1
                if b % every == 0 or b == total:
                    log.step(b, len(y) * every, loss if log.progress else None)
                if cfg.checkpoint_every and pos["step"] % cfg.checkpoint_every == 0:
                    result.checkpoint = self._checkpoint(epoch, b, pos, acc, result)
            if b == start and not start:
                raise ConfigError(f"fit(): {data.what} yielded no batch in epoch {epoch + 1}.")
            row = self._epoch_end(epoch, val, acc, pos)
            acc.zero_()
            result.history.append(row)
            log.record(pos["step"], row)
            if cfg.print_every and (epoch + 1) % cfg.print_every == 0 and self.rank == 0:
                print("  ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in row.items() if not isinstance(v, dict)))
            stop = self._early_stop(row, pos)
            if cfg.run_dir is not None:
                result.checkpoint = self._checkpoint(epoch + 1, 0, pos, acc, result)
            if stop:
                result.stopped_early = True
                break

    def _step(self, x: torch.Tensor, y: torch.Tensor, pos: dict, result: FitResult
              ) -> float:
        cfg = self.cfg
        for saved, b in zip(self.saved, self.buffers, strict=True):
            saved.copy_(b)
        task, aux, pred, out = unpack(self.net(x), y, self.fn, True)
        loss = task if aux is None else task + aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.fsdp:  # what no rank used keeps no gradient, as under DDP and in one process
            forget_unused(self.model)
        if self.l1:  # d/dp l1*|p| = l1*sign(p), added after backward: see _l1_grad
            _l1_grad(self.l1, cfg.l1)
        if cfg.clip_grad_norm:
            check = nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
            if self.fsdp:  # a DTensor norm over every shard
                check = check.full_tensor()
        else:  # any NaN/Inf element makes its sum non-finite; one read of each gradient
            grads = [_local(p.grad) for p in self.params if p.grad is not None]
            check = torch.stack([g.sum() if g.dtype in _WIDE else g.sum(dtype=torch.float32)
                                 for g in grads]).sum() if grads else loss.new_zeros(())
            if self.fsdp:  # each rank holds other shards: all must agree to skip or stop
                check = check.detach().clone()
                dist.all_reduce(check)
        value = loss.item()
        if not (math.isfinite(value) and math.isfinite(float(check))):
            self._nonfinite(loss, pos, result)
            return value
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        n = y.shape[0]
        self.loss_total += (value if aux is None else task.item()) * n
        self.samples += n
        if self.accuracy or self.steps:
            with torch.no_grad():
                _, _, correct, steps = self.slots
                if self.accuracy:
                    correct.add_((pred.argmax(-1) == y).sum())
                counted = statistic(out, "steps") if self.steps else None
                if counted is not None:
                    steps.add_(counted.sum())
        return value

    def _flush(self, acc: torch.Tensor) -> None:
        """Move the Python running sums of loss and samples into ``acc``."""
        acc[0] += self.loss_total
        acc[1] += self.samples
        self.loss_total, self.samples = 0.0, 0

    def _nonfinite(self, loss: torch.Tensor, pos: dict, result: FitResult) -> None:
        bad = tuple(self.names[id(p)] for p in self.params
                    if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all()))
        what = f"the loss is {float(loss.detach())}" if not bool(torch.isfinite(loss)) else \
            "the loss is finite"
        grads = f"non-finite gradients in {', '.join(bad)}" if bad else "finite gradients"
        with torch.no_grad():  # undo what the forward pass did to running statistics
            for saved, b in zip(self.saved, self.buffers, strict=True):
                b.copy_(saved)
        if self.cfg.nonfinite == "skip":
            self.opt.zero_grad(set_to_none=True)
            result.skipped += 1
            return
        kept = str(result.checkpoint) if result.checkpoint else None
        raise NonFiniteError(
            f"fit(): step {pos['step']} (epoch {pos['epoch'] + 1}): {what}, with {grads}. The "
            "weights and buffers were not updated"
            + (f"; the last good checkpoint is {kept}" if kept else "")
            + ". Lower the learning rate, clip gradients (clip_grad_norm=1.0), or skip such "
            "batches (nonfinite='skip').", step=pos["step"], parameters=bad, checkpoint=kept)

    def _epoch_end(self, epoch: int, val: Source | None, acc: torch.Tensor, pos: dict) -> dict:
        self._flush(acc)
        if self.world > 1:
            dist.all_reduce(acc)
        count = max(float(acc[1]), 1.0)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": pos["step"],
                               "lr": max(g["lr"] for g in self.opt.param_groups)}
        row["train/loss"] = float(acc[0]) / count
        if "accuracy" in self.metrics:
            row["train/accuracy"] = float(acc[2]) / count
        if "perplexity" in self.metrics:
            row["train/perplexity"] = math.exp(min(row["train/loss"], 700))
        if "steps" in self.metrics:
            row["train/steps"] = float(acc[3]) / count
        if val is not None:
            values = run_evaluation(self.model, val, self.fn, self.metrics, self.cfg.batch_size,
                               self.device)
            row |= {f"val/{k}": v for k, v in values.items()}
            self.model.train()
        pos["epoch"], pos["batch"] = epoch + 1, 0
        return row

    def _early_stop(self, row: dict, pos: dict) -> bool:
        if not self.cfg.early_stopping:
            return False
        value = row.get("val/loss", row["train/loss"])
        if value < pos["best"]:
            pos["best"], pos["bad_epochs"] = value, 0
            return False
        pos["bad_epochs"] += 1
        return pos["bad_epochs"] >= self.cfg.early_stopping

    def _checkpoint(self, epoch: int, batch: int, pos: dict, acc: torch.Tensor,
                    result: FitResult) -> Path | None:
        self._flush(acc)
        total = acc.clone()
        if self.world > 1:  # every rank's running sums so far in this epoch
            dist.all_reduce(total)
        if self.rank != 0:
            if self.fsdp:  # gathers its shards into the files rank 0 writes
                optimizer_state(self.model, self.opt, sharded=True)
                save(self.model, os.devnull)
            return None
        state = {"format": 1, "epoch": epoch, "batch": batch, "step": pos["step"],
                 "best": pos["best"], "bad_epochs": pos["bad_epochs"], "order": pos["order"],
                 "skipped": result.skipped, "history": result.history, "acc": total,
                 "optimizer": optimizer_state(self.model, self.opt, self.fsdp),
                 "scheduler": self.sched.state_dict() if self.sched is not None else None,
                 "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized()
                 else []}
        return write_checkpoint(self.cfg.run_dir, pos["step"], self.model, state,
                                self.cfg.keep_checkpoints)

    def _restore(self, state: dict, pos: dict, result: FitResult) -> None:
        restore_optimizer(self.model, self.opt, state["optimizer"],
                          [self.names[id(p)] for p in self.params], self.fsdp)
        if self.sched is not None and state["scheduler"] is not None:
            self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        if state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        pos.update(epoch=state["epoch"], batch=state["batch"], step=state["step"],
                   best=state["best"], bad_epochs=state["bad_epochs"], order=state["order"])
        result.history = list(state["history"])
        result.skipped = state["skipped"]


def _destroy_group() -> None:
    """Tear down the process group ``fit`` made, unless the user already did."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's API (torch)


def _l1_grad(params: list[torch.Tensor], strength: float) -> None:
    """Add the L1 penalty's gradient ``strength * sign(p)`` to each ``p.grad``.

    The same as adding ``strength * sum |p|`` to the loss (autograd's ``abs``
    also has gradient 0 at 0), but outside the forward pass: DDP with
    ``find_unused_parameters`` would otherwise see a parameter it marked unused
    (a path no sample took) receive a gradient, and fail.
    """
    with torch.no_grad():
        for p in params:
            if not p.requires_grad:
                continue  # frozen for now (a schedule may unfreeze it later)
            if p.grad is None:
                p.grad = torch.sign(p) * strength
            else:
                p.grad.add_(torch.sign(p), alpha=strength)

