"""Benchmark: per-sample branch vs the static network, masking, the loop, and hand-written code.

Two MLP branches (256 -> 1024 -> 256, ReLU), half the samples on each,
forward+backward. Variants, interleaved within each round, medians over rounds:

- static:  one MLP on the whole batch (what a network without the branch costs)
- branch:  ``adaptnet.branch`` (partition: gather, run each path, merge)
- hand:    the same partition written out by hand in plain PyTorch
- masked:  both MLPs on the whole batch, merged with ``torch.where``
- loop:    a Python loop over single samples

Targets (issue 3): branch ≤ 1.10× static at B=256; masked ≥ 1.8× branch; loop ≥ 15× branch.

    python benchmarks/bench_route.py            # full (about 3 minutes on 2 cores)
    python benchmarks/bench_route.py --quick    # smoke test, tiny sizes
"""

from __future__ import annotations

import torch
from _common import medians, parse_args, publish, table, time_steps, verdict
from torch import nn

import adaptnet


def mlp(d: int, h: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))


def variants(a: nn.Module, b: nn.Module) -> dict:
    def static(pred, x):
        return a(x)

    def branch(pred, x):
        return adaptnet.branch(pred, a, b, x)

    def hand(pred, x):
        ia, ib = pred.nonzero().squeeze(1), (~pred).nonzero().squeeze(1)
        out = x.new_empty(x.shape[0], a[-1].out_features)
        return out.index_put((ia,), a(x[ia])).index_put((ib,), b(x[ib]))

    def masked(pred, x):
        return torch.where(pred[:, None], a(x), b(x))

    def loop(pred, x):
        return torch.cat([(a if p else b)(x[i:i + 1]) for i, p in enumerate(pred.tolist())])

    return {"static": static, "branch": branch, "hand": hand, "masked": masked, "loop": loop}


def run(batch: int, d: int, h: int, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    a, b = mlp(d, h), mlp(d, h)
    params = [*a.parameters(), *b.parameters()]
    x = torch.randn(batch, d)
    pred = torch.rand(batch) < 0.5
    fns = variants(a, b)
    ref = fns["masked"](pred, x)
    for name in ("branch", "hand", "loop"):
        torch.testing.assert_close(fns[name](pred, x), ref, rtol=1e-4, atol=1e-5)
    calls = {k: (lambda f=f: f(pred, x)) for k, f in fns.items()}
    counts = {k: max(1, iters // 10) if k == "loop" else iters for k in fns}
    med = medians(time_steps(calls, params, rounds, counts))
    return {"batch": batch, "dim": d, "hidden": h, "rounds": rounds, "iters": iters,
            "ms": {k: v * 1e3 for k, v in med.items()},
            "branch_vs_static": med["branch"] / med["static"],
            "branch_vs_hand": med["branch"] / med["hand"],
            "masked_vs_branch": med["masked"] / med["branch"],
            "loop_vs_branch": med["loop"] / med["branch"]}


def markdown(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        t = r["ms"]
        rows.append([r["batch"], *(f"{t[k]:.2f}" for k in ("static", "branch", "hand",
                                                            "masked")), f"{t['loop']:.1f}",
                     f"{r['branch_vs_static']:.3f} ({verdict(r['branch_vs_static'] <= 1.1)})",
                     f"{r['branch_vs_hand']:.3f}",
                     f"{r['masked_vs_branch']:.2f} ({verdict(r['masked_vs_branch'] >= 1.8)})",
                     f"{r['loop_vs_branch']:.1f} ({verdict(r['loop_vs_branch'] >= 15)})"])
    r0 = result["runs"][0]
    return "\n".join([
        *table(["B", "static", "branch", "hand", "masked", "loop", "branch / static (≤ 1.10)",
                "branch / hand", "masked / branch (≥ 1.8)", "loop / branch (≥ 15)"], rows),
        "", f"Times in ms per forward+backward step; median of {r0['rounds']} interleaved "
            f"rounds of {r0['iters']} steps ({max(1, r0['iters'] // 10)} for the loop)."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        runs = [run(16, 8, 16, args.rounds or 3, 4)]
    else:
        runs = [run(batch, 256, 1024, args.rounds or 15, 20) for batch in (256, 512)]
    publish("route", args, {"runs": runs}, markdown)


if __name__ == "__main__":
    main()
