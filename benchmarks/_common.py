"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
    """The options every benchmark takes: --quick, --rounds, --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per comparison")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    return parser.parse_args()


def publish(name: str, args: argparse.Namespace, data: dict,
            markdown: Callable[[dict], str]) -> None:
    """Write <out>/<name>[-quick].json and .md (with command and machine); print the table."""
    result = {"command": f"python benchmarks/bench_{name}.py" + (" --quick" if args.quick else ""),
              "machine": machine(), **data}
    stem = f"{name}-quick" if args.quick else name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def machine_line(m: dict) -> str:
    return f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}."


def time_steps(fns: dict[str, Callable[[], torch.Tensor]], params: list[torch.Tensor],
               rounds: int, iters: int | dict[str, int],
               loss: Callable[[torch.Tensor], torch.Tensor] = lambda out: out.square().mean(),
               ) -> dict[str, list[float]]:
    """Seconds per forward+backward step of each variant, one entry per round.

    One warm-up step each, then ``rounds`` rounds; each round times every
    variant for ``iters`` steps (a dict gives per-variant counts), starting from
    a different variant each round so that order effects cancel in the median.
    """
    def step(fn: Callable[[], torch.Tensor], n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            for p in params:
                p.grad = None
            loss(fn()).backward()
        return (time.perf_counter() - start) / n

    counts = iters if isinstance(iters, dict) else dict.fromkeys(fns, iters)
    for fn in fns.values():
        step(fn, 1)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(step(fns[k], counts[k]))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}
