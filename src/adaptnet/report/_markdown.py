"""``report.md`` for a run directory and ``compare.md`` for a comparison, with their plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from adaptnet import _rundir
from adaptnet._io import atomic_path
from adaptnet.report._plots import bars, curves, histogram, params_by_module

__all__ = ["compare_table", "markdown_table", "write_compare", "write_report"]


def _write(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table.

    Example:
        >>> from adaptnet.report import markdown_table
        >>> rows = [["mlp", "0.91"], ["moe", "0.93"]]
        >>> print("\\n".join(markdown_table(["model", "accuracy"], rows)))
        | model | accuracy |
        |---|---|
        | mlp | 0.91 |
        | moe | 0.93 |
    """
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def write_report(run_dir: str | Path) -> Path:
    """Render ``report.md`` and its PNGs from the files in ``run_dir``; return the report's path.

    Example:
        >>> import tempfile
        >>> from adaptnet.recipes import load_recipe, train_recipe
        >>> from adaptnet.report import write_report
        >>> name, recipe = load_recipe("mnist1d-mlp", ["train.epochs=1"])
        >>> run = train_recipe(name, recipe, tempfile.mkdtemp() + "/run", limit=64).run_dir
        >>> path = write_report(run)  # train_recipe wrote it too: this renders it again
        >>> path.name, path.read_text().splitlines()[0]
        ('report.md', '# Run `mnist1d-mlp`')
    """
    run = Path(run_dir)
    results = _rundir.read_results(run)
    summary = _rundir.read_json(run, _rundir.SUMMARY)
    stored = _rundir.read_config(run)
    config = {"recipe": stored.recipe, "limit": stored.limit, **stored.body}
    plots = run / _rundir.PLOTS
    lines = [f"# Run `{results.recipe}`", "", config.get("description") or "", "",
             f"Model `{results.model}` on `{results.dataset}` "
             f"({', '.join(f'{k} {v:,}' for k, v in results.samples.items())} samples); "
             f"{results.epochs} epochs in {results.train_seconds:.1f} s.", "",
             "## Test results", "", "| measure | value |", "|---|---|"]
    for key, value in results.test.items():
        if isinstance(value, dict):
            value = ", ".join(f"exit {k}: {v:.1%}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:,.4g}" if key != "accuracy" else f"{value:.2%}"
        lines.append(f"| {key} | {value} |")
    p = results.params
    lines += [f"| unique parameters | {p['unique']:,} |",
              f"| parameters per use | {p['per_use']:,} |",
              f"| inference, ms per 1k samples (batched, median of 15) | "
              f"{results.infer_ms_per_1k:.2f} |", ""]
    if results.history:
        curves(results.history, plots / "curves.png")
        lines += ["## Learning curves", "", "![learning curves](plots/curves.png)", ""]
        if "exit_index" in results.counts:
            lines += ["The training loss is BranchyNet's joint loss, summed over the exits; the "
                      "validation loss is that of the exit each sample took.", ""]
    for attr, label, unit in (("exit_index", "exit taken", "sample"),
                              ("steps", "steps executed", "sample"),
                              ("depth", "blocks run", "token")):
        counts = results.counts.get(attr)
        if counts:
            first = 1 if attr == "steps" else 0
            histogram(counts[first:], plots / f"{attr}.png", xlabel=label, first=first)
            lines += [f"## {label.capitalize()} per {unit}", "",
                      f"![{label}](plots/{attr}.png)", ""]
    params_by_module(summary, plots / "params.png")
    lines += ["## Parameters by module", "", "![parameters](plots/params.png)", "",
              "| module | type | per use | unique | shares |", "|---|---|---:|---:|---|"]
    for row in summary["rows"]:
        lines.append(f"| `{row['name'] or '(root)'}` | {row['type']} | {row['per_use']:,} | "
                     f"{row['unique']:,} | {'; '.join(row['shared'])} |")
    lines += ["", "## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False)
              .rstrip(), "```", ""]
    return _write(run / _rundir.REPORT, "\n".join(lines))


def compare_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header and rows of the comparison table, as strings."""
    metric = rows[0]["metric"]
    decoding = all("tokens_per_s" in r for r in rows)  # Hugging Face models (adaptnet.hf)
    table = [["variant", "unique params", "trainable", metric, "MACs/sample", "ms/1k samples",
              "train s", *(("decode tokens/s", "layers/token", "agreement") if decoding
                           else ())]]
    for r in rows:
        value = f"{r['value']:.2%}" if metric == "accuracy" else f"{r['value']:.4g}"
        macs = f"{r['macs']:,.0f}" if r.get("macs") is not None else "-"
        trainable = f"{r['trainable_params']:,}" if "trainable_params" in r else "-"
        table.append([r["variant"], f"{r['unique_params']:,}", trainable, value, macs,
                      f"{r['infer_ms_per_1k']:.2f}", f"{r['train_seconds']:.1f}",
                      *((f"{r['tokens_per_s']:.0f}", f"{r['layers_per_token']:.2f}",
                         f"{r['agreement']:.1%}") if decoding else ())])
    return table


def write_compare(out_dir: str | Path, title: str) -> Path:
    """``compare.md`` and ``compare.png`` from ``compare.json`` in ``out_dir``."""
    out = Path(out_dir)
    rows = json.loads((out / "compare.json").read_text())
    bars(rows, out / "compare.png")
    table = compare_table(rows)
    lines = [f"# {title}", "", *markdown_table(table[0], table[1:]), "",
             "![comparison](compare.png)", ""]
    if all(r.get("run_dir") for r in rows):  # variants of a recipe, each with its run
        lines += ["Runs: " + ", ".join(f"[{r['variant']}]({Path(r['run_dir']).name}/report.md)"
                                       for r in rows), ""]
    return _write(out / "compare.md", "\n".join(lines))
