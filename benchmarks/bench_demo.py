"""Benchmark: the flagship (`adaptnet demo`): plain CNN vs its early-exit twin on MNIST-1D.

Runs exactly what ``adaptnet demo`` runs (``adaptnet.recipes.flagship``: both
networks trained with one recipe, seed and budget; the exits' threshold
calibrated on the validation split; test accuracy; both networks timed in the
same rounds at 1 and 2 threads, batched at 256), then times the two trained
networks again in ``REPEATS`` more independent side-by-side timings, to show
how far the speed-up moves run to run.

Target (issue "Make adaptivity pay"): ≥ 1.5× faster than the plain network at
B=256 on 1 and on 2 threads, at most 0.5 points less accurate, reproducible
within ±10%; issue "Ahead of every peer": clock efficiency (speed-up ÷ the
reduction in multiply-adds) ≥ 0.7 at both thread counts.

The repeats also time the same exit logic written by hand on the same trained
networks (``HandExits``: stem, then each stage and head on the rows still in,
boolean keep, no exit-index bookkeeping; outputs checked equal first), and one
trained stage's convolution on 256, 64, 32 and 16 rows, the row counts the
early-exit network's later stages see.

    python benchmarks/bench_demo.py           # full (2 to 6 minutes on 2 cores)
    python benchmarks/bench_demo.py --quick   # smoke test: 64 samples
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from _common import medians, parse_args, publish, table, time_calls, verdict
from torch import nn

from adaptnet.recipes import flagship, load_run
from adaptnet.study import time_together

REPEATS = 3
ROWS = (256, 64, 32, 16)


class HandExits(nn.Module):
    """The early-exit network's eval pass written out by hand: each stage and head on the
    rows still in, the max-probability test, the leaving rows' logits written once."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if any(t != 1.0 for t in net.exits.temperatures) or net.exits.rule != "max_prob":
            raise SystemExit("HandExits covers the max_prob rule at temperature 1 only")
        self.stem, self.stages, self.heads = net.stem, net.exits.stages, net.exits.heads
        self.thresholds = net.exits.thresholds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        out, rows = None, None
        for i, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
            h = stage(h)
            logits = head(h)
            if out is None:
                out = logits
            else:
                out[rows] = logits
            if i == len(self.heads) - 1:
                break
            keep = torch.softmax(logits, -1).amax(-1) < self.thresholds[i]
            rows = keep.nonzero().squeeze(1) if rows is None else rows[keep]
            if not rows.numel():
                break
            h = h[keep]
        return out


def exits_alone(net: nn.Module, hand: nn.Module, x: torch.Tensor, rounds: int
                ) -> dict[int, float]:
    """``EarlyExit``'s time over the hand-written exits', the two alone in interleaved rounds
    (twice the rounds), at 1 and 2 threads."""
    def run(model: nn.Module) -> None:
        for chunk in x.split(256):
            model(chunk)

    out = {}
    with torch.inference_mode():
        for t in (1, 2):
            torch.set_num_threads(t)
            got = medians(time_calls({"exit": lambda: run(net), "hand": lambda: run(hand)},
                                     2 * rounds, 3))
            out[t] = got["exit"] / got["hand"]
    return out


def conv_rows(stage: nn.Module, rounds: int) -> dict[int, dict[int, float]]:
    """Microseconds per call of one trained stage's convolution on ``ROWS`` rows, at 1 and
    2 threads, the row counts interleaved."""
    conv = stage.layer
    out: dict[int, dict[int, float]] = {}
    with torch.inference_mode():
        xs = {n: torch.randn(n, conv.in_channels, 20) for n in ROWS}
        for t in (1, 2):
            torch.set_num_threads(t)
            got = medians(time_calls({n: (lambda x=x: conv(x)) for n, x in xs.items()},
                                     rounds, 20))
            out[t] = {n: 1e6 * v for n, v in got.items()}
    return out


def main() -> None:
    args = parse_args(__doc__)
    rounds = args.rounds or (3 if args.quick else 21)
    with tempfile.TemporaryDirectory() as tmp:
        result = flagship(Path(tmp), limit=64 if args.quick else None, rounds=rounds)
        data, plain, _ = load_run(result.runs[0])
        _, net, _ = load_run(result.runs[1])
        net.exits.set_thresholds(result.threshold)
        x = data.test.tensors[0][:1024]
        hand = HandExits(net).eval()
        net.eval()
        with torch.no_grad():
            for chunk in x.split(256):
                torch.testing.assert_close(hand(chunk), net(chunk).output, rtol=0, atol=0)
        repeats: dict[int, list[float]] = {t: [result.speedup[t]] for t in (1, 2)}
        by_hand: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(REPEATS):
            for t in (1, 2):
                torch.set_num_threads(t)
                # plain twice: in the rotation exit and hand each follow a plain pass in
                # 3 rounds of 4 (with plain once, exit would in 2 of 3 and hand in 1)
                got = time_together({"plain": plain, "exit": net, "plain again": plain,
                                     "hand": hand}, x, rounds)
                repeats[t].append(got["plain"] / got["exit"])
                by_hand[t].append(got["plain"] / got["hand"])
        convs = conv_rows(net.exits.stages[1], rounds)
        alone = exits_alone(net, hand, x, rounds)
    data_out = {"rows": [vars(r) for r in result.rows], "threshold": result.threshold,
                "valid_accuracy": result.valid_accuracy, "speedup": result.speedup,
                "repeats": repeats, "by_hand": by_hand, "conv_us": convs, "alone": alone,
                "rounds": rounds}
    publish("demo", args, data_out, markdown)


def markdown(result: dict) -> str:
    plain, fast = result["rows"]
    points = 100 * (fast["accuracy"] - plain["accuracy"])
    rows = []
    for r in (plain, fast):
        rows.append([r["variant"], f"{r['params']:,}", f"{100 * r['accuracy']:.1f}%",
                     f"{r['macs']:,.0f}",
                     *(f"{r['ms_per_1k'][t]:.1f}" for t in sorted(r["ms_per_1k"]))])
    fewer = plain["macs"] / fast["macs"]
    speed_rows = []
    for t, values in sorted(result["repeats"].items()):
        spread = max(values) / min(values) - 1
        med = statistics.median(values)
        hand = result["by_hand"][t]
        speed_rows.append([t, " / ".join(f"{v:.2f}" for v in values),
                           f"{med:.2f} ({verdict(min(values) >= 1.5)}, ≥ 1.5 in every timing)",
                           f"{100 * spread:.0f}% ({verdict(spread <= 0.2)}, within ±10%)",
                           f"{med / fewer:.2f} ({verdict(med / fewer >= 0.7)}, ≥ 0.7)",
                           " / ".join(f"{v:.2f}" for v in hand)])
    conv_rows_md = [[t, *(f"{row[n]:.0f} ({row[n] / n / (row[256] / 256):.2f}×)" for n in ROWS)]
                    for t, row in result["conv_us"].items()]
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
                "median", "max / min − 1", "clock efficiency (median ÷ MAC reduction)",
                "hand-written exits, same timings"], speed_rows), "",
        f"Each timing: {result['rounds']} interleaved rounds, one batched (256) eval pass over "
        "1,024 test samples per network per round; the figure is plain / early exit of the "
        "medians. *Hand-written exits*: plain / `HandExits` (the same exit logic written "
        "out, no exit-index bookkeeping, outputs equal) in the repeats' rounds. Timed alone "
        f"against each other ({2 * result['rounds']} interleaved rounds), `EarlyExit` takes "
        + ", ".join(f"{v:.3f}× the hand-written exits' time at {t} thread{'s' * (t > 1)}"
                    for t, v in result["alone"].items()) + ".", "",
        "One trained stage's convolution (64 → 64 channels, width 3, 20 positions), µs per "
        "call by rows (median of interleaved rounds); in brackets the cost per row against "
        "256 rows':", "",
        *table(["threads", *(f"{n} rows" for n in ROWS)], conv_rows_md)]) + "\n"


if __name__ == "__main__":
    main()
