"""Wall time side by side, and the metric a table leads with."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

__all__ = ["headline", "time_inference", "time_together"]


def headline(test: dict[str, Any]) -> tuple[str, float]:
    """The metric a table shows: accuracy, else perplexity, else loss.

    Example:
        >>> from adaptnet.study import headline
        >>> headline({"loss": 0.4, "accuracy": 0.9}), headline({"loss": 1.2, "perplexity": 3.3})
        (('accuracy', 0.9), ('perplexity', 3.3))
    """
    for key in ("accuracy", "perplexity", "loss"):
        if key in test:
            return key, float(test[key])
    raise AssertionError("evaluate() always reports loss")


def time_inference(model: nn.Module, x: torch.Tensor, rounds: int = 15, batch: int = 256
                   ) -> float:
    """Median wall time (ms) of batched eval-mode inference, per 1,000 samples.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptnet.study import time_inference
        >>> ms = time_inference(nn.Linear(8, 2), torch.randn(512, 8), rounds=3)
        >>> ms > 0
        True
    """
    return time_together({"model": model}, x, rounds, batch)["model"]


def time_together(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 15,
                  batch: int = 256) -> dict[str, float]:
    """Median wall time (ms per 1,000 samples) of batched eval-mode inference, side by side.

    Every round runs one pass over ``x`` (in chunks of ``batch``) per model,
    starting from a different model each round, so that the models share the
    machine's state (caches, clocks, other load) and order effects cancel in
    the median; one warm-up pass each first. Timing models in separate runs
    is what made one ratio read 0.40x, 0.81x and 1.18x in three runs.

    The allocator is settled first (:func:`_settle_allocator`), so that no
    model's activations are handed back to the OS and faulted in again on
    every pass, which otherwise depends on what the process did before.

    Example:
        >>> import torch, torch.nn as nn
        >>> from adaptnet.study import time_together
        >>> models = {"narrow": nn.Linear(8, 2), "wide": nn.Sequential(nn.Linear(8, 512),
        ...     nn.Linear(512, 2))}
        >>> # interleaved rounds, medians
        >>> times = time_together(models, torch.randn(512, 8), rounds=3)
        >>> sorted(times)
        ['narrow', 'wide']
    """
    _settle_allocator()
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


def _settle_allocator() -> None:
    """Free one 31 MiB block, so that glibc's malloc serves later blocks from its heap.

    glibc maps each block over its mmap threshold (128 KiB at start) afresh and
    returns the heap's free top beyond twice that to the OS; freeing a mapped block
    raises the threshold to its size (up to 32 MiB). Until a process has freed one
    as large as its activations, each pass pays page faults for them: a 256-row
    64-channel convolution's 1.3 MB output took 1.55 ms against 0.50 ms at 2
    threads, and the flagship's plain CNN ran at half speed in one process and not
    in another (BENCHMARKS section 0). Other allocators only see an allocation.
    """
    block = torch.empty(31 << 18)  # 31 MiB of float32, under glibc's 32 MiB cap
    del block  # mapped on allocation, untouched: freeing it is what moves the thresholds
