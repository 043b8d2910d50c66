"""PNG plots of a run or a comparison, drawn with matplotlib's object API (no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptnet._io import atomic_path

__all__ = ["bars", "curves", "histogram", "params_by_module"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # imported on use: adaptnet imports fast

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def curves(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Learning curves: loss and the headline metric per epoch, train vs validation."""
    metric = next((m for m in ("accuracy", "perplexity") if f"train/{m}" in history[0]), None)
    panels = ["loss"] + ([metric] if metric else [])
    fig = _figure(4.2 * len(panels), 3.2)
    epochs = [row["epoch"] for row in history]
    for ax, name in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for split, style in (("train", "-o"), ("val", "--s")):
            values = [row.get(f"{split}/{name}") for row in history]
            if all(v is not None for v in values):
                ax.plot(epochs, values, style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def histogram(counts: Sequence[int], path: Path, *, xlabel: str, first: int = 0) -> Path:
    """Samples per exit or per step count (``counts[i]`` samples at ``first + i``)."""
    fig = _figure(4.8, 3.2)
    ax = fig.subplots()
    total = max(sum(counts), 1)
    xs = list(range(first, first + len(counts)))
    bars_ = ax.bar(xs, [100.0 * c / total for c in counts], color="tab:blue")
    ax.bar_label(bars_, labels=[f"{c}" for c in counts], fontsize=8)
    ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("% of test samples")
    ax.set_title(f"{xlabel}: {total} test samples")
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def params_by_module(summary: dict[str, Any], path: Path) -> Path:
    """Parameters per module (two path levels): unique (memory) vs per use (what layers see)."""
    groups: dict[str, list[int]] = {}
    for row in summary["rows"]:
        top = ".".join(row["name"].split(".")[:2]) or "(root)"
        g = groups.setdefault(top, [0, 0])
        g[0] += row["unique"]
        g[1] += row["per_use"]
    names = list(groups)
    fig = _figure(6.4, 0.45 * len(names) + 1.9)
    ax = fig.subplots()
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], [groups[n][1] for n in names], height=0.4,
            color="tab:gray", label="per use")
    ax.barh([y - 0.2 for y in ys], [groups[n][0] for n in names], height=0.4,
            color="tab:blue", label="unique")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("parameters")
    ax.set_title(f"{summary['model']}: {summary['unique']:,} unique, "
                 f"{summary['per_use']:,} per use")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def bars(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One bar chart per measure for the variants of a comparison."""
    measures = [("unique_params", "unique parameters"), ("value", rows[0]["metric"]),
                ("macs", "multiply-adds per sample"), ("infer_ms_per_1k", "ms per 1k samples")]
    measures = [(k, t) for k, t in measures if all(r.get(k) is not None for r in rows)]
    fig = _figure(3.4 * len(measures), 3.4)
    labels = [r["variant"] for r in rows]
    for ax, (key, title) in zip(fig.subplots(1, len(measures), squeeze=False)[0], measures,
                                strict=True):
        values = [r[key] for r in rows]
        b = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(b, labels=[_short(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _short(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
