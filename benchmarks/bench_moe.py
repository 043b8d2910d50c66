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

import torch
from _common import medians, parse_args, publish, table, time_steps, verdict
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
    med = medians(time_steps({"moe": sparse, "dense": dense}, list(moe.parameters()), rounds,
                             iters))
    return {"tokens": tokens, "dim": d, "hidden": h, "experts": E, "k": k, "rounds": rounds,
            "iters": iters, "ms": {name: v * 1e3 for name, v in med.items()},
            "moe_vs_dense": med["moe"] / med["dense"], "target": 1.3 * k / E}


def markdown(result: dict) -> str:
    r = result["run"]
    ok = r["moe_vs_dense"] <= r["target"]
    return "\n".join([
        *table(["tokens", "experts", "k", "moe (ms)", "dense (ms)", "moe / dense",
                "target (1.3 k/E)"],
               [[r["tokens"], r["experts"], r["k"], f"{r['ms']['moe']:.1f}",
                 f"{r['ms']['dense']:.1f}", f"{r['moe_vs_dense']:.3f}",
                 f"≤ {r['target']:.3f}: {verdict(ok)}"]]),
        "",
        f"Times per forward+backward step; median of {r['rounds']} interleaved rounds of "
        f"{r['iters']} steps.",
    ]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        r = run(64, 8, 16, 8, 2, args.rounds or 3, 2)
    else:
        r = run(2048, 256, 1024, 8, 2, args.rounds or 15, 3)
    publish("moe", args, {"run": r}, markdown)


if __name__ == "__main__":
    main()
