"""The ``adaptnet`` command: train, eval, summary, compare, recipes, models, demo.

It only binds arguments and calls the library; every error adaptnet raises on
purpose is printed as one message (no traceback) with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from adaptnet._rundir import REPORT, RunResults
from adaptnet._table import show, table
from adaptnet.errors import AdaptnetError, RunDirError

app = typer.Typer(help="Dynamic neural networks with shared and tied weights: train, evaluate "
                  "and compare recipes.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)
out = Console()
err = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(
    help="key=value overrides of the recipe, e.g. train.lr=0.001 model.hidden=128.",
    show_default=False)]
Limit = Annotated[int | None, typer.Option(
    min=1, help="Use only the first N samples of each split: a quick check that a recipe runs.")]
TrustCode = Annotated[bool, typer.Option(
    "--trust-code", help="Run the code a recipe's or run's model.builder names (its module is "
    "imported). Recipes and run directories are data: without this, one that names code is "
    "refused.")]


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except AdaptnetError as e:
        err.print(f"[bold red]error:[/] {type(e).__name__}: ", end="", highlight=False)
        err.print(str(e), markup=False, highlight=False)
        raise typer.Exit(2) from None


def _default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def train(recipe: Annotated[str, typer.Argument(help="A recipe file or a shipped recipe name.")],
          overrides: Overrides = None,
          run_dir: Annotated[Path | None, typer.Option(
              help="Where the run goes (default runs/<recipe>-<time>).")] = None,
          resume: Annotated[bool, typer.Option(
              help="Continue from the newest checkpoint in --run-dir.")] = False,
          resume_unverified: Annotated[bool, typer.Option(
              help="With --resume: also use checkpoints without checksums (written by an "
              "older adaptnet), which cannot be verified.")] = False,
          extend: Annotated[bool, typer.Option(
              help="With --resume: train a run longer (train.epochs above its own); recorded "
              "in its config.yaml. Every other change to the recipe still refuses.")] = False,
          limit: Limit = None, trust_code: TrustCode = False) -> None:
    """Train a recipe; write the run directory, its report and plots."""
    from adaptnet.recipes import load_recipe, train_recipe

    with _errors():
        name, parsed = load_recipe(recipe, overrides or [])
        _say_user_code(parsed, trust_code)
        if resume and run_dir is None:
            raise AdaptnetError("--resume needs --run-dir, the run to continue.")
        if resume_unverified and not resume:
            raise AdaptnetError("--resume-unverified goes with --resume.")
        if run_dir is not None and run_dir.resolve() == Path.cwd().resolve():
            raise RunDirError(f"--run-dir {str(run_dir)!r} is the current directory; give "
                              "a directory of its own for the run, e.g. --run-dir runs/mine.")
        result = train_recipe(name, parsed, run_dir or _default_run_dir(name), resume=resume,
                              limit=limit, trust_code=trust_code,
                              resume_unverified=resume_unverified, extend=extend)
    _print_results(result.results)
    if result.results.backbone is not None:
        out.print(f"pretrained backbone: {result.results.backbone}")
    out.print(f"run directory: {result.run_dir}\nreport: {result.run_dir / REPORT}")


def _print_results(results: RunResults) -> None:
    rows = []
    for key, value in results.test.items():
        if isinstance(value, dict):
            value = " ".join(f"{k}:{v:.0%}" for k, v in value.items())
        rows.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    rows += [("unique params", f"{results.params['unique']:,}"),
             ("trainable params", f"{results.params['trainable']:,}"),
             ("train seconds", f"{results.train_seconds:.1f}")]
    if results.decode is not None:  # a Hugging Face model's greedy decoding, against its base
        d = results.decode
        rows += [("decode tokens/s", f"{d['tokens_per_s']:.0f}"),
                 ("base model tokens/s", f"{d['base_tokens_per_s']:.0f}"),
                 ("agreement with base", f"{d['agreement']:.1%}"),
                 ("layers per token", f"{d['layers_per_token']:.2f} of {d['layers']}")]
    show(out, table(f"{results.recipe}: test", ("measure", "value"), rows, numbers=[1]))


def _say_user_code(recipe, trust_code: bool) -> None:
    """Refuse a recipe that names code without --trust-code; with it, name each module its
    ``model.builder`` (or its backbone's) imports, before anything imports it."""
    from adaptnet.recipes import code_notices

    for notice in code_notices(recipe, trust_code):
        out.print(f"model.builder runs your code: {notice}")


@app.command("eval")
def eval_(run: Annotated[Path, typer.Argument(help="A run directory made by `adaptnet train`.")],
          split: Annotated[str, typer.Option(help="train, valid or test.")] = "test",
          trust_code: TrustCode = False) -> None:
    """Evaluate a trained run on a split of its dataset."""
    from adaptnet.recipes import evaluate_run, read_run_config

    with _errors():
        _say_user_code(read_run_config(run)[2], trust_code)
        values = evaluate_run(run, split, trust_code=trust_code)
    title = f"{values.pop('recipe')}: {values.pop('split')}"
    show(out, table(title, ("measure", "value"), [
        (key, json.dumps(value) if isinstance(value, dict) else f"{value:.4g}")
        for key, value in values.items()], numbers=[1]))


@app.command()
def summary(target: Annotated[str, typer.Argument(
        help="A recipe (file or shipped name) or a run directory.")],
            overrides: Overrides = None, trust_code: TrustCode = False) -> None:
    """Print the sharing-aware parameter table of a recipe's or run's model."""
    from adaptnet.recipes import load_recipe, prepare, read_run_config
    from adaptnet.sharing import summary as summarize

    with _errors():
        if Path(target).is_dir():
            parsed = read_run_config(Path(target))[2]
        else:
            parsed = load_recipe(target, overrides or [])[1]
        _say_user_code(parsed, trust_code)
        _, model, _ = prepare(parsed, limit=1, trust_code=trust_code)
        out.print(summarize(model))


@app.command()
def compare(recipe: Annotated[str, typer.Argument(help="A recipe file or shipped name.")],
            vary: Annotated[list[str], typer.Option(
                help="key=v1,v2[,...]; repeat to vary several keys (every combination).")],
            overrides: Overrides = None,
            out_dir: Annotated[Path | None, typer.Option(
                help="Where the variants' runs go (default runs/compare-<recipe>-<time>).")]
            = None,
            limit: Limit = None, trust_code: TrustCode = False) -> None:
    """Train variants of a recipe side by side; print one table and write a plot."""
    from adaptnet.recipes import compare_variants, load_recipe, variants

    with _errors():
        name = Path(recipe).stem
        _say_user_code(load_recipe(recipe, overrides or [])[1], trust_code)
        target = out_dir or _default_run_dir(f"compare-{name}")
        rows = compare_variants(recipe, variants(vary), overrides or [], target, limit=limit,
                           trust_code=trust_code)
    _print_compare(rows, target, f"compare {name}")


def _print_compare(rows: list[dict], target: Path, title: str) -> None:
    from adaptnet.report import write_compare
    from adaptnet.study import Comparison

    report = write_compare(target, title)
    show(out, Comparison(rows, report, title))
    out.print(f"report: {report}\nplot: {target / 'compare.png'}")


@app.command()
def recipes() -> None:
    """List the shipped recipes."""
    from adaptnet._shipped import shipped_recipes  # not adaptnet.recipes: no torch to import

    show(out, table("shipped recipes (adaptnet train NAME)", ("name", "description"),
                    list(shipped_recipes().items())))


@app.command()
def models() -> None:
    """List the model zoo's builders."""
    from adaptnet.models import MODELS, describe

    show(out, table("model zoo (model.name in a recipe)", ("name", "description"),
                    [(name, describe(name)) for name in MODELS]))


@app.command()
def demo(out_dir: Annotated[Path | None, typer.Option(
        help="Where the runs go (default runs/demo-<time>).")] = None,
         limit: Limit = None) -> None:
    """Train a plain CNN and its early-exit twin on MNIST-1D; calibrate; time them side by side."""
    from adaptnet.recipes import flagship

    target = out_dir or _default_run_dir("demo")
    out.print("Training a plain CNN and the same CNN with an exit after every stage on "
              "MNIST-1D (generated locally), then calibrating the exits on the validation "
              "split and timing both networks side by side...")
    with _errors():
        result = flagship(target, limit=limit)
    header, rows = result.table()
    show(out, table(f"demo: {result.title}", header, rows, numbers=range(1, len(header))))
    out.print("\n".join([*result.summary(), f"runs, timings, report.md: {target}"]))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
