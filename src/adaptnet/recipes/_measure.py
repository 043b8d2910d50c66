"""What a run measures: test metrics, parameters, executed compute, wall time side by side."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from adaptnet import sharing
from adaptnet.data import DataSplits
from adaptnet.dynamic import DecoderResult, DynamicResult
from adaptnet.recipes._hf import decode_figures, is_adapted
from adaptnet.train import TrainConfig, evaluate

__all__ = ["eval_metrics", "headline", "measure", "time_inference", "time_together"]


def measure(model: nn.Module, data: DataSplits, cfg: TrainConfig) -> dict[str, Any]:
    """Test metrics, parameters, executed compute, inference time and exit/step counts."""
    test = evaluate(model, data.test, loss=cfg.loss, metrics=eval_metrics(cfg))
    s = sharing.summary(model)
    x = data.test.tensors[0][:1024]
    model.eval()
    with torch.no_grad():
        out = model(x)
    stats = out.statistics() if isinstance(out, DynamicResult) else {}
    # histograms of whole counts: the exit each sample took, the steps it ran, or (token
    # models, whose per-sample steps are means) the blocks each real token went through
    whole = {"exit_index": stats.get("exit_index"), "steps": stats.get("steps")}
    if isinstance(out, DecoderResult):
        whole = {"depth": out.depth if out.mask is None else out.depth[out.mask]}
    counts = {name: torch.bincount(t.long().flatten()).tolist()
              for name, t in whole.items() if t is not None}
    values = {"test": test, "params": {"unique": s.unique, "per_use": s.per_use,
                                       "trainable": s.trainable},
              "infer_ms_per_1k": time_inference(model, x), "counts": counts,
              "metric": headline(test)}
    if is_adapted(model):  # a Hugging Face model: decoding speed, agreement with the base
        values["decode"] = decode_figures(model, x[:8, :32])
    return values


def eval_metrics(cfg: TrainConfig) -> tuple[str, ...]:
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

