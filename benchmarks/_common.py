"""Helpers shared by the benchmark scripts: options, timing, tables and results files."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from adaptnet.study._timing import _settle_allocator

RESULTS = Path(__file__).resolve().parent / "results"
# Where the long benchmarks keep their runs, so that a cut one resumes (git ignores runs/).
RUNS = Path(__file__).resolve().parent.parent / "runs" / "bench"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def parse_args(doc: str) -> argparse.Namespace:
    """The options every benchmark takes: --quick, --rounds, --out, --train-only."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per comparison")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or resume) the runs and stop before timing, to time them "
                        "later with nothing else running (the benchmarks that train and time)")
    return parser.parse_args()


def runs_root(name: str, args: argparse.Namespace) -> Path:
    """Where a benchmark that trains keeps its runs: under ``--out`` when quick."""
    return args.out / f"{name}-quick-runs" if args.quick else RUNS / name


def publish(name: str, args: argparse.Namespace, data: dict | None,
            markdown: Callable[[dict], str]) -> None:
    """Write <out>/<name>[-quick].json and .md and print the table.

    The markdown starts with the command and the machine; ``markdown(result)``
    gives the rest (tables that state their runs and medians). ``data`` is
    None after ``--train-only``: nothing is written.
    """
    if data is None:
        print(f"Trained: the runs are in {runs_root(name, args)}; run again without "
              "--train-only to time them.")
        return
    command = f"python benchmarks/bench_{name}.py" + (" --quick" if args.quick else "")
    result = {"command": command, "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), **data}
    text = f"Command: `{command}` ({result['date']}). {machine_line(result['machine'])}\n\n" \
        + markdown(result)
    stem = f"{name}-quick" if args.quick else name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    print(text)


def machine_line(m: dict) -> str:
    return f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}."


_NUMBER = re.compile(r"^[-+−]?[\d.,]+\s*(×|%|x|ms|s)?$")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table; columns whose every cell is a number are right-aligned."""
    cells = [[c if isinstance(c, str) else f"{c}" for c in row] for row in rows]
    right = [bool(cells) and all(_NUMBER.match(row[i]) for row in cells)
             for i in range(len(header))]
    return ["| " + " | ".join(header) + " |",
            "|" + "|".join("---:" if r else "---" for r in right) + "|",
            *("| " + " | ".join(row) + " |" for row in cells)]


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def time_calls(fns: dict[str, Callable[[], object]], rounds: int,
               iters: int | dict[str, int], clock: Callable[[], float] = time.perf_counter
               ) -> dict[str, list[float]]:
    """Seconds per call of each variant, one entry per round.

    One warm-up call each, then ``rounds`` rounds; each round times every
    variant for ``iters`` calls (a dict gives per-variant counts), starting from
    a different variant each round so that order effects cancel in the median.
    ``clock``: wall time by default; ``time.process_time`` gives the process's CPU
    time (every thread's), which another process on the machine disturbs less.
    """
    def timed(fn: Callable[[], object], n: int) -> float:
        start = clock()
        for _ in range(n):
            fn()
        return (clock() - start) / n

    counts = iters if isinstance(iters, dict) else dict.fromkeys(fns, iters)
    _settle_allocator()  # as time_together does: no activations faulted in on every call
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(fns[k], counts[k]))
    return times


def time_steps(fns: dict[str, Callable[[], torch.Tensor]], params: list[torch.Tensor],
               rounds: int, iters: int | dict[str, int],
               loss: Callable[[torch.Tensor], torch.Tensor] = lambda out: out.square().mean(),
               ) -> dict[str, list[float]]:
    """Seconds per forward+backward step of each variant (see :func:`time_calls`)."""
    def step(fn: Callable[[], torch.Tensor]) -> None:
        for p in params:
            p.grad = None
        loss(fn()).backward()

    return time_calls({k: (lambda f=f: step(f)) for k, f in fns.items()}, rounds, iters)


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def train_seeds(recipe: str, plans: dict[str, dict], overrides: list[str], seeds: list[int],
                root: Path, limit: int | None = None, keep: Path | None = None,
                keep_weights: bool = False) -> list[dict]:
    """Train every variant of ``recipe`` once per seed; return one row per run.

    Each run goes to ``root/<variant>-<hash>/seed-<S>``, the hash naming the
    recipe exactly as trained (overrides and limit applied), so a changed
    setting never picks up an old run. Given a lasting ``root`` the benchmark can
    be cut and run again: a finished run (its ``results.json`` is there) is read
    back, one cut short resumes from its last checkpoint (``train_recipe``
    checks it is the same recipe). ``seed=S`` sets initialisation and data order;
    the dataset itself (its own ``data.seed``) stays as the recipe has it.
    Every variant is validated before the first one trains.

    ``keep``: a directory laid out like ``root`` that receives each finished
    run's ``results.json`` (small; committed with the benchmark's results), and
    that is read first: a run finished there is not trained again even when
    ``root`` (checkpoints and weights, which git ignores) was lost. Rows read
    from it name a ``run_dir`` that may not exist, unless ``keep_weights``:
    then ``config.yaml`` and ``model.safetensors`` are kept beside it (for small
    models whose benchmark loads the trained weights, which a lost ``root``
    would otherwise send back to training) and rows name the kept directory,
    which :func:`adaptnet.recipes.load_run` reads.
    """
    from adaptnet.recipes import load_recipe, parse_overrides, train_recipe

    base = parse_overrides(overrides)
    runs = []
    for seed in seeds:
        for label, plan in plans.items():
            name, loaded = load_recipe(recipe, {**base, **plan, "seed": seed})
            setting = {k: v for k, v in loaded.to_dict().items() if k != "seed"}
            key = json.dumps([setting, limit], sort_keys=True).encode()
            slug = re.sub(r"\W+", "_", label)[:60]
            runs.append((seed, label, name, loaded,
                         root / f"{slug}-{hashlib.sha1(key).hexdigest()[:10]}" / f"seed-{seed}"))
    files = ["config.yaml", "model.safetensors", "results.json"] if keep_weights \
        else ["results.json"]
    rows = []
    for seed, label, name, loaded, run_dir in runs:
        done = run_dir / "results.json"
        kept = keep / run_dir.relative_to(root) if keep else None
        if kept is not None and all((kept / f).is_file() for f in files):
            done = kept / "results.json"
        elif not done.is_file():
            train_recipe(name, loaded, run_dir, resume=(run_dir / "config.yaml").is_file(),
                         limit=limit)
        if kept is not None and done.parent != kept:
            kept.mkdir(parents=True, exist_ok=True)
            for f in files:  # results.json last: a cut copy keeps nothing
                write_whole(kept / f, (run_dir / f).read_bytes())
            done = kept / "results.json"
        if keep_weights:
            run_dir = done.parent
        values = json.loads(done.read_text())
        rows.append({"seed": seed, "variant": label, "run_dir": str(run_dir),
                     "unique_params": values["params"]["unique"],
                     "per_use_params": values["params"]["per_use"],
                     "metric": values["metric"][0], "value": values["metric"][1],
                     "macs": values["test"].get("macs"), "epochs": values["epochs"],
                     "history": values["history"], "train_seconds": values["train_seconds"]})
    return rows


def annealed(recipe: str, epochs: int) -> list[str]:
    """Overrides for ``epochs`` epochs of ``recipe`` with the learning rate annealed to zero
    (cosine) over all their steps, at the recipe's own batch size."""
    from adaptnet.recipes import load_recipe, prepare

    loaded = load_recipe(recipe)[1]
    steps = math.ceil(len(prepare(loaded, None)[0].train) / loaded.train["batch_size"])
    return [f"train.epochs={epochs}", "train.scheduler=CosineAnnealingLR",
            f"train.scheduler_args={{T_max: {epochs * steps}}}"]


def settled(history: list[dict]) -> float:
    """Relative fall of the validation loss over the last quarter of the epochs."""
    loss = [row["val/loss"] for row in history]
    return (loss[-1 - len(loss) // 4] - loss[-1]) / loss[-1]


def write_whole(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file and a rename: a cut write leaves no part."""
    part = path.with_name(f"{path.name}.tmp")
    part.write_bytes(data)
    os.replace(part, path)


def stopped_early(history: list[dict], patience: int) -> bool:
    """Early stopping fired: the last ``patience`` epochs did not beat the best before them."""
    loss = [row["val/loss"] for row in history]
    return len(loss) > patience and min(loss[-patience:]) >= min(loss[:-patience])


def stopping(result: dict) -> str:
    """The sentence that states a converged benchmark's overrides, seeds and stopping rule."""
    return (f"Settings: {', '.join(result['overrides'])}; seeds "
            f"{', '.join(map(str, result['seeds']))}; each run stops when the validation loss "
            f"has not improved for {result['patience']} epochs (at most {result['max_epochs']}); "
            "test perplexity is the final model's; median (min–max) over seeds.")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def show(s: dict[str, float], fmt: str = ".2%") -> str:
    """``median (min–max)``, or just the value when there was one run."""
    if s["min"] == s["max"]:
        return f"{s['median']:{fmt}}"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def settings(result: dict) -> str:
    """The sentence that states a training benchmark's overrides and seeds."""
    return (f"Settings: {', '.join(result['overrides']) or 'the recipe as shipped'}; seeds "
            f"{', '.join(map(str, result['seeds']))}, one training run per seed and variant; "
            "median (min–max) when several.")
