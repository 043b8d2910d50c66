"""Benchmark: what adaptnet's dynamic constructs cost over the same logic written by hand.

Eval-mode (no grad) forward passes at B=256, at 1 and at 2 threads, every
variant of a table interleaved in the same rounds, medians over rounds:

- **branch**: ``adaptnet.branch`` vs the hand-written partition (two
  ``nonzero``, gathers, ``index_put`` into a preallocated output) vs the static
  network (one path for the whole batch), for a 10→50→1 and a 256→1024→256 MLP
  per path, half the rows on each.
- **early exit**: ``EarlyExit`` vs the same loop in raw PyTorch (one
  ``nonzero`` per exit, ``index_copy_`` into preallocated outputs), on the
  demo's network shape (a strided conv stem, four 64-channel residual conv
  stages, a linear exit after each) with the threshold set so that about 80%,
  12%, 5% and 3% of the rows leave at exits 1–4.
- **compiled capacity vs eager exact**: ``torch.compile(fullgraph=True)`` of
  ``route_topk`` (k = B/2) against eager ``branch`` with the same split, and
  of the early-exit network in capacity mode (``capacity=0.2``: 20% go on at
  each exit) against eager exact mode with thresholds that send the same
  shares on.

    python benchmarks/bench_lean.py           # full (a few minutes on 2 cores)
    python benchmarks/bench_lean.py --quick   # smoke test
"""

from __future__ import annotations

import os
import time

import torch
from _common import medians, parse_args, publish, table, time_calls, verdict
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adaptnet
from adaptnet.models import build


def mlp(d: int, h: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, out))


def branch_variants(d: int, h: int, out: int, B: int) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    a, b = mlp(d, h, out), mlp(d, h, out)
    x = torch.randn(B, d)
    pred = torch.rand(B) < 0.5

    def hand() -> torch.Tensor:
        ia, ib = pred.nonzero().squeeze(1), (~pred).nonzero().squeeze(1)
        y = x.new_empty(B, out)
        y.index_put_((ia,), a(x[ia]))
        return y.index_put_((ib,), b(x[ib]))

    fns = {"static": lambda: a(x), "branch": lambda: adaptnet.branch(pred, a, b, x),
           "hand": hand}
    torch.testing.assert_close(fns["branch"](), hand())
    return fns, x


def exit_net(capacity: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    return build("early_exit_cnn", channels=64, stages=4, pool=20, threshold=0.5,
                 capacity=capacity).eval()


def calibrated_threshold(net: nn.Module, x: torch.Tensor, first: float) -> float:
    """The max-prob threshold at which ``first`` of the rows leave at exit 1."""
    with torch.no_grad():
        z = net.exits.all_exits(net.stem(x))[0]
    conf = torch.softmax(z, -1).amax(-1)
    return float(torch.quantile(conf, 1 - first))


def early_exit_variants(B: int) -> tuple[dict, dict]:
    net = exit_net()
    x = torch.randn(B, 40) * torch.linspace(0.2, 3, B)[:, None]
    threshold = calibrated_threshold(net, x, 0.8)
    net.exits.set_thresholds(threshold)
    stem, stages, heads = net.stem, list(net.exits.stages), list(net.exits.heads)

    def hand() -> tuple[torch.Tensor, torch.Tensor]:
        h = stem(x)
        out, index, ids = None, torch.zeros(B, dtype=torch.long), None
        for i, (stage, head) in enumerate(zip(stages, heads, strict=True)):
            h = stage(h)
            z = head(h)
            if ids is None:
                out = z.clone()
            else:
                out.index_copy_(0, ids, z)
                index.index_fill_(0, ids, i)
            if i == len(heads) - 1:
                break
            keep = (torch.softmax(z, -1).amax(-1) < threshold).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            ids = keep if ids is None else ids[keep]
            h = h[keep]
        return out, index

    with torch.no_grad():
        r = net(x)
        o, i = hand()
    torch.testing.assert_close(r.output, o)
    assert torch.equal(r.exit_index, i)
    shares = (torch.bincount(r.exit_index, minlength=4).double() / B).tolist()
    return {"EarlyExit": lambda: net(x), "hand": hand}, {"threshold": threshold,
                                                          "exit_shares": shares}


def compiled_variants(B: int) -> dict:
    torch.manual_seed(0)
    a, b = mlp(10, 50, 1), mlp(10, 50, 1)
    x = torch.randn(B, 10)
    score = x[:, 0]

    def topk(x: torch.Tensor) -> torch.Tensor:
        return adaptnet.route_topk(x[:, 0], x.shape[0] // 2, a, x, other=b)

    compiled_topk = torch.compile(topk, fullgraph=True)
    pred = score >= score.median()
    exact = exit_net()
    capacity = exit_net(capacity=0.2)
    xe = torch.randn(B, 40) * torch.linspace(0.2, 3, B)[:, None]
    # Exact mode with thresholds that send on the same shares as capacity=0.2.
    with torch.no_grad():
        exits = exact.exits.all_exits(exact.stem(xe))
        r = capacity(xe)
    reached = [(r.exit_index >= i) for i in range(4)]
    thresholds = []
    for i in range(3):
        conf = torch.softmax(exits[i][reached[i]], -1).amax(-1)
        thresholds.append(float(conf.sort().values[len(conf) - int(reached[i + 1].sum()) - 1]))
    exact.exits.set_thresholds(thresholds)
    compiled_exit = torch.compile(capacity, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled_topk(x), topk(x))
        torch.testing.assert_close(compiled_exit(xe).output, r.output)
    return {"mlp": {"branch (eager exact)": lambda: adaptnet.branch(pred, a, b, x),
                    "route_topk (compiled capacity)": lambda: compiled_topk(x)},
            "early exit": {"EarlyExit (eager exact)": lambda: exact(xe),
                           "EarlyExit (compiled capacity)": lambda: compiled_exit(xe)}}


def aten_ops(fn) -> int:
    """ATen operators one call of ``fn`` dispatches."""
    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        fn()
    return Count.n


def timed(fns: dict, rounds: int, iters: int) -> dict[str, float]:
    with torch.no_grad():
        return medians(time_calls(fns, rounds, iters))


def run(threads: int, rounds: int, iters: int, B: int, quick: bool) -> dict:
    torch.set_num_threads(threads)
    sizes = [(10, 50, 1)] if quick else [(10, 50, 1), (256, 1024, 256)]
    branches = []
    for d, h, out in sizes:
        fns, _ = branch_variants(d, h, out, B)
        t = timed(fns, rounds, iters)
        branches.append({"size": f"{d}→{h}→{out}", "us": {k: v * 1e6 for k, v in t.items()},
                         "branch_vs_hand": t["branch"] / t["hand"],
                         "branch_vs_static": t["branch"] / t["static"]})
    fns, info = early_exit_variants(B)
    # twice the rounds, on one pinned core at 1 thread, CPU time beside wall time, and the
    # ATen operators each dispatches: steady enough to tell a few percent apart
    cores = os.sched_getaffinity(0)
    if threads == 1:
        os.sched_setaffinity(0, {min(cores)})
    try:
        t = timed(fns, 2 * rounds, max(1, iters // 10))
        with torch.no_grad():
            cpu = medians(time_calls(fns, 2 * rounds, max(1, iters // 10), time.process_time))
    finally:
        os.sched_setaffinity(0, cores)
    early = {"us": {k: v * 1e6 for k, v in t.items()}, **info,
             "exit_vs_hand": t["EarlyExit"] / t["hand"],
             "cpu_us": {k: v * 1e6 for k, v in cpu.items()},
             "cpu_exit_vs_hand": cpu["EarlyExit"] / cpu["hand"],
             "aten_ops": {k: aten_ops(f) for k, f in fns.items()}}
    compiled = {}
    for name, group in compiled_variants(B).items():
        t = timed(group, rounds, iters if name == "mlp" else max(1, iters // 10))
        eager, comp = list(t)
        compiled[name] = {"us": {k: v * 1e6 for k, v in t.items()},
                          "speedup": t[eager] / t[comp]}
    return {"threads": threads, "batch": B, "rounds": rounds, "branch": branches,
            "early_exit": early, "compiled": compiled}


def markdown(result: dict) -> str:
    lines = []
    rows = []
    for r in result["runs"]:
        for b in r["branch"]:
            t = b["us"]
            limit = 1.10 if b["size"].startswith("10→") else 1.02
            rows.append([r["threads"], b["size"], f"{t['static']:.0f}", f"{t['branch']:.0f}",
                         f"{t['hand']:.0f}",
                         f"{b['branch_vs_hand']:.3f} ({verdict(b['branch_vs_hand'] <= limit)}, "
                         f"≤ {limit:.2f})",
                         f"{b['branch_vs_static']:.3f} "
                         f"({verdict(b['branch_vs_static'] <= 1.10)})"])
    lines += ["**branch** (µs per eval forward, B=256, half the rows on each path)", "",
              *table(["threads", "MLP per path", "static", "branch", "hand", "branch / hand",
                      "branch / static (≤ 1.10)"], rows), ""]
    rows = []
    for r in result["runs"]:
        e = r["early_exit"]
        ops = e.get("aten_ops", {})
        rows.append([r["threads"], " / ".join(f"{s:.0%}" for s in e["exit_shares"]),
                     f"{e['us']['EarlyExit']:.0f}", f"{e['us']['hand']:.0f}",
                     f"{e['exit_vs_hand']:.3f} ({verdict(e['exit_vs_hand'] <= 1.03)})",
                     f"{e['cpu_exit_vs_hand']:.3f}",
                     f"{ops.get('EarlyExit', '-')} / {ops.get('hand', '-')}"])
    lines += ["**EarlyExit vs the same loop in raw PyTorch** (µs per eval forward, B=256; "
              "wall time, and the process's CPU time in its own interleaved rounds; "
              "at 1 thread on one pinned core)", "",
              *table(["threads", "rows leaving at exit 1 / 2 / 3 / 4", "EarlyExit", "hand",
                      "EarlyExit / hand (≤ 1.03)", "CPU time ratio",
                      "ATen ops per call (ours / hand)"], rows), ""]
    rows = []
    for r in result["runs"]:
        for name, c in r["compiled"].items():
            (eager, te), (comp, tc) = c["us"].items()
            rows.append([r["threads"], name, f"{eager}: {te:.0f}", f"{comp}: {tc:.0f}",
                         f"{c['speedup']:.2f} ({verdict(c['speedup'] >= 1.3)})"])
    lines += ["**Compiled capacity mode vs eager exact mode** (µs per eval forward, B=256; "
              "the same shares of rows on each path or past each exit)", "",
              *table(["threads", "network", "eager exact", "compiled capacity",
                      "speed-up (≥ 1.3)"], rows), "",
              f"Medians of {result['runs'][0]['rounds']} interleaved rounds per table "
              f"({2 * result['runs'][0]['rounds']} for EarlyExit)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    rounds = args.rounds or (3 if args.quick else 21)
    iters, B = (4, 32) if args.quick else (200, 256)
    runs = [run(t, rounds, iters, B, args.quick) for t in (1, 2)]
    publish("lean", args, {"runs": runs}, markdown)


if __name__ == "__main__":
    main()
