"""Benchmark: adaptive depth's wall time follows the mean executed steps, not the maximum.

A shared residual MLP block (256 -> 1024 -> 256) applied up to 10 times. To
control the mean depth exactly, the state carries a per-sample budget channel
that each step decrements, and the halting head fires when it reaches zero.
Budgets are 1..5 uniformly: mean/max = 3/10 = 0.3. Forward+backward.
Variants, interleaved, medians over rounds:

- adaptive: ``AdaptiveDepth`` with those budgets (shrinking active set)
- full:     the same module with every budget at 10 (everyone runs 10 steps)
- fixed:    the block applied 10 times in a plain loop (no halting machinery)
- hand:     the shrinking loop written out in plain PyTorch
- masked:   everyone runs 10 steps; each sample's state at its halting step is
            picked with ``torch.where`` (what common ACT code does)

Target (issue 3): adaptive ≤ 1.15 × (mean/max) × full.

    python benchmarks/bench_depth.py            # full (about 2 minutes on 2 cores)
    python benchmarks/bench_depth.py --quick    # smoke test, tiny sizes
"""

from __future__ import annotations

import torch
from _common import medians, parse_args, publish, table, time_steps, verdict
from torch import nn

import adaptnet


class Block(nn.Module):
    """Residual MLP on the features; decrements the budget channel (the last one)."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (b, d + 1) -> (b, d + 1)
        feats, budget = s[:, :-1], s[:, -1:]
        return torch.cat([feats + self.mlp(feats), budget - 1], dim=1)


class BudgetHead(nn.Module):
    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (b, d + 1) -> (b,)
        return -s[:, -1] * 100.0  # sigmoid >= 0.5 once the budget is spent


def run(batch: int, d: int, h: int, max_steps: int, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    block = Block(d, h)
    model = adaptnet.AdaptiveDepth(block, adaptnet.dynamic.ThresholdHalting(BudgetHead(), 0.5),
                                   max_steps)
    feats = torch.randn(batch, d)
    budgets = torch.randint(1, max_steps // 2 + 1, (batch,)).float()
    x_adaptive = torch.cat([feats, budgets[:, None]], 1)
    x_full = torch.cat([feats, torch.full((batch, 1), float(max_steps))], 1)
    ratio = budgets.mean().item() / max_steps

    def adaptive():
        return model(x_adaptive).output

    def full():
        return model(x_full).output

    def fixed():
        s = x_full
        for _ in range(max_steps):
            s = block(s)
        return s

    def hand():  # the shrinking loop written out in plain PyTorch, for the library's overhead
        s, ids, parts = x_adaptive, torch.arange(batch), []
        for t in range(1, max_steps + 1):
            s = block(s)
            fin = budgets[ids] == t
            parts.append((ids[fin], s[fin]))
            s, ids = s[~fin], ids[~fin]
        order = torch.cat([p[0] for p in parts])
        return torch.cat([p[1] for p in parts])[torch.argsort(order)]

    def masked():
        s, out = x_adaptive, torch.zeros_like(x_adaptive)
        for t in range(1, max_steps + 1):
            s = block(s)
            out = torch.where((budgets == t)[:, None], s, out)
        return out

    torch.testing.assert_close(adaptive(), masked())
    torch.testing.assert_close(adaptive(), hand())
    fns = {"adaptive": adaptive, "hand": hand, "full": full, "fixed": fixed, "masked": masked}
    med = medians(time_steps(fns, list(block.parameters()), rounds, iters,
                             loss=lambda out: out[:, :-1].square().mean()))
    return {"batch": batch, "dim": d, "hidden": h, "max_steps": max_steps,
            "mean_steps": budgets.mean().item(), "mean_over_max": ratio,
            "rounds": rounds, "iters": iters, "ms": {k: v * 1e3 for k, v in med.items()},
            "adaptive_vs_full": med["adaptive"] / med["full"],
            "adaptive_vs_hand": med["adaptive"] / med["hand"],
            "hand_vs_full": med["hand"] / med["full"],
            "target": 1.15 * ratio,
            "full_vs_fixed": med["full"] / med["fixed"],
            "masked_vs_adaptive": med["masked"] / med["adaptive"]}


def markdown(result: dict) -> str:
    r = result["run"]
    t = r["ms"]
    rows = [[r["batch"], f"{r['mean_steps']:.2f}/{r['max_steps']} = {r['mean_over_max']:.2f}",
             *(f"{t[k]:.1f}" for k in ("adaptive", "hand", "full", "fixed", "masked")),
             f"{r['adaptive_vs_full']:.3f}",
             f"≤ {r['target']:.3f}: {verdict(r['adaptive_vs_full'] <= r['target'])}",
             f"{r['hand_vs_full']:.3f}", f"{r['adaptive_vs_hand']:.3f}",
             f"{r['full_vs_fixed']:.3f}", f"{r['masked_vs_adaptive']:.2f}"]]
    return "\n".join([
        *table(["B", "mean/max steps", "adaptive", "hand", "full", "fixed loop", "masked",
                "adaptive / full", "target (1.15 × mean/max)", "hand / full",
                "adaptive / hand", "full / fixed", "masked / adaptive"], rows),
        "",
        f"Times in ms per forward+backward step; median of {r['rounds']} interleaved rounds "
        f"of {r['iters']} steps.",
    ]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        r = run(16, 8, 16, 10, args.rounds or 3, 2)
    else:
        r = run(256, 256, 1024, 10, args.rounds or 25, 4)
    publish("depth", args, {"run": r}, markdown)


if __name__ == "__main__":
    main()
