"""Benchmark: top-2-of-8 mixture of experts with sorted dispatch vs running every expert densely.

Eight expert MLPs (256 -> 1024 -> 256), 2048 tokens, forward+backward.
Variants, interleaved, medians over rounds:

- moe:    ``adaptnet.MoE`` (k=2): each expert runs only on its tokens
- dense:  every expert on every token, combined with the same (sparse) gates

Target (issue 3): moe ≤ 1.3 × (2/8) × dense.

    python benchmarks/bench_moe.py            # full (about 1 minute on 2 cores)
    python benchmarks/bench_moe.py --quick    # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, machine
from torch import nn

import adaptnet


def run(tokens: int, d: int, h: int, E: int, k: int, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)) for _ in range(E)]
    moe = adaptnet.MoE(experts, nn.Linear(d, E), k=k)
    x = torch.randn(tokens, d)

    def sparse():
        return moe(x).output

    def dense():
        logits = moe.router(x)
        top_logits, top = logits.topk(k, dim=-1)
        weights = torch.zeros_like(logits).scatter(1, top, torch.softmax(top_logits, -1))
        return sum(weights[:, e:e + 1] * experts[e](x) for e in range(E))

    torch.testing.assert_close(sparse(), dense(), rtol=1e-4, atol=1e-5)
    fns = {"moe": sparse, "dense": dense}
    params = list(moe.parameters())

    def step(fn, n):
        start = time.perf_counter()
        for _ in range(n):
            for p in params:
                p.grad = None
            fn().square().mean().backward()
        return (time.perf_counter() - start) / n

    for fn in fns.values():
        step(fn, 1)
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (["moe", "dense"] if r % 2 == 0 else ["dense", "moe"]):
            times[name].append(step(fns[name], iters))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"tokens": tokens, "dim": d, "hidden": h, "experts": E, "k": k, "rounds": rounds,
            "iters": iters, "ms": {name: v * 1e3 for name, v in med.items()},
            "moe_vs_dense": med["moe"] / med["dense"], "target": 1.3 * k / E}


def markdown(result: dict) -> str:
    m, r = result["machine"], result["run"]
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}.",
        "",
        "| tokens | experts | k | moe (ms) | dense (ms) | moe / dense | target |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['tokens']} | {r['experts']} | {r['k']} | {r['ms']['moe']:.1f} | "
        f"{r['ms']['dense']:.1f} | {r['moe_vs_dense']:.3f} | ≤ {r['target']:.3f} |",
        "",
        f"Times per forward+backward step; median of {r['rounds']} interleaved rounds of "
        f"{r['iters']} steps.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per comparison")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    if args.quick:
        r = run(64, 8, 16, 8, 2, args.rounds or 3, 2)
    else:
        r = run(2048, 256, 1024, 8, 2, args.rounds or 15, 3)
    result = {"command": "python benchmarks/bench_moe.py" + (" --quick" if args.quick else ""),
              "machine": machine(), "run": r}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "moe-quick" if args.quick else "moe"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
