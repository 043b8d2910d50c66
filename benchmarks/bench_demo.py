"""Benchmark: the flagship (`adaptnet demo`): plain CNN vs its early-exit twin on MNIST-1D.

Runs exactly what ``adaptnet demo`` runs (``adaptnet.recipes.flagship``: both
networks trained with one recipe, seed and budget; the exits' threshold
calibrated on the validation split; test accuracy; both networks timed in the
same rounds at 1 and 2 threads, batched at 256), then times the two trained
networks again in ``REPEATS`` more independent side-by-side timings, to show
how far the speed-up moves run to run.

Target (issue "Make adaptivity pay"): ≥ 1.5× faster than the plain network at
B=256 on 1 and on 2 threads, at most 0.5 points less accurate, reproducible
within ±10%.

    python benchmarks/bench_demo.py           # full (about 6 minutes on 2 cores)
    python benchmarks/bench_demo.py --quick   # smoke test: 64 samples
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from _common import parse_args, publish, table, verdict

from adaptnet.recipes import flagship, load_run
from adaptnet.study import time_together

REPEATS = 3


def main() -> None:
    args = parse_args(__doc__)
    rounds = args.rounds or (3 if args.quick else 21)
    with tempfile.TemporaryDirectory() as tmp:
        result = flagship(Path(tmp), limit=64 if args.quick else None, rounds=rounds)
        data, plain, _ = load_run(result.runs[0])
        _, net, _ = load_run(result.runs[1])
        net.exits.set_thresholds(result.threshold)
        x = data.test.tensors[0][:1024]
        repeats: dict[int, list[float]] = {t: [result.speedup[t]] for t in (1, 2)}
        for _ in range(REPEATS):
            for t in (1, 2):
                torch.set_num_threads(t)
                got = time_together({"plain": plain, "exit": net}, x, rounds)
                repeats[t].append(got["plain"] / got["exit"])
    data_out = {"rows": [vars(r) for r in result.rows], "threshold": result.threshold,
                "valid_accuracy": result.valid_accuracy, "speedup": result.speedup,
                "repeats": repeats, "rounds": rounds}
    publish("demo", args, data_out, markdown)


def markdown(result: dict) -> str:
    plain, fast = result["rows"]
    points = 100 * (fast["accuracy"] - plain["accuracy"])
    rows = []
    for r in (plain, fast):
        rows.append([r["variant"], f"{r['params']:,}", f"{100 * r['accuracy']:.1f}%",
                     f"{r['macs']:,.0f}",
                     *(f"{r['ms_per_1k'][t]:.1f}" for t in sorted(r["ms_per_1k"]))])
    speed_rows = []
    for t, values in sorted(result["repeats"].items()):
        spread = max(values) / min(values) - 1
        speed_rows.append([t, " / ".join(f"{v:.2f}" for v in values),
                           f"{statistics.median(values):.2f} "
                           f"({verdict(min(values) >= 1.5)}, ≥ 1.5 in every timing)",
                           f"{100 * spread:.0f}% ({verdict(spread <= 0.2)}, within ±10%)"])
    shares = " / ".join(f"{100 * s:.0f}%" for s in fast["exit_shares"])
    return "\n".join([
        *table(["network", "parameters", "test accuracy", "multiply-adds / sample",
                "ms / 1k, 1 thread", "ms / 1k, 2 threads"], rows), "",
        f"Accuracy: early exit {points:+.1f} points vs plain "
        f"({verdict(points >= -0.5)}, ≥ −0.5). Threshold {result['threshold']:.3f}, "
        f"calibrated on the validation split (validation accuracy: plain "
        f"{100 * result['valid_accuracy'][0]:.2f}%, early exit "
        f"{100 * result['valid_accuracy'][1]:.2f}%). Samples leaving at exit 1 / 2 / 3 / 4: "
        f"{shares}. Multiply-adds: {plain['macs'] / fast['macs']:.2f}× fewer.", "",
        *table(["threads", "speed-up in each side-by-side timing (the demo's first)",
                "median", "max / min − 1"], speed_rows), "",
        f"Each timing: {result['rounds']} interleaved rounds, one batched (256) eval pass over "
        "1,024 test samples per network per round; the figure is plain / early exit of the "
        "medians."]) + "\n"


if __name__ == "__main__":
    main()
