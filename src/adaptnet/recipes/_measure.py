"""What a run measures: test metrics, parameters, executed compute, wall time side by side."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptnet import sharing
from adaptnet.data import DataSplits
from adaptnet.dynamic import DecoderResult, DynamicResult
from adaptnet.recipes._hf import decode_figures, is_adapted
from adaptnet.study import headline, time_inference
from adaptnet.train import TrainConfig, evaluate

__all__ = ["eval_metrics", "measure"]


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
