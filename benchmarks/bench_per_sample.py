"""Benchmark: ``@per_sample`` vs the same logic by hand with ``branch``, vmap, masking, the loop.

The textbook network written for one example: ``h = relu(hidden(x))``, then
``out(h)`` if ``h.sum() > threshold`` else ``out(-h)``, with the threshold set
to the median of the batch so both paths get half the samples (the harder case
for partitioning). Forward+backward per step; variants interleaved within each
round, medians over rounds:

- per_sample: the decorated ``forward`` (row-wise fast path where it applies)
- branch:     the same logic written by hand with ``adaptnet.branch``
- vmap_only:  ``@per_sample`` with the row-wise fast path disabled (every
              segment under ``torch.func.vmap``): what the fast path buys
- masked:     both paths on every sample, merged with ``torch.where``
- loop:       the undecorated forward called on one example at a time

Targets (issue 4), B=256: per_sample ≤ 1.3× branch for 10→50→1 and ≤ 1.1× for
256→1024→256; per_sample ≥ 10× faster than the loop.

    python benchmarks/bench_per_sample.py            # full (about 2 minutes on 2 cores)
    python benchmarks/bench_per_sample.py --quick    # smoke test, tiny sizes
"""

from __future__ import annotations

import contextlib

import torch
from _common import medians, parse_args, publish, table, time_steps, verdict
from torch import nn

import adaptnet
from adaptnet.dynamic._per_sample import _batched
from adaptnet.dynamic._per_sample._rowwise import NotRowwise


class Textbook(nn.Module):
    def __init__(self, d: int, h: int, out: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d, h)
        self.out = nn.Linear(h, out)
        self.relu = nn.ReLU()
        self.threshold = 0.0

    def one(self, x):  # written for ONE example
        x = self.relu(self.hidden(x))
        if x.sum() > self.threshold:
            x = self.out(x)
        else:
            x = self.out(-x)
        return x

    forward = adaptnet.per_sample(one)


@contextlib.contextmanager
def _refuse(inputs):
    raise NotRowwise("fast path disabled for the benchmark")
    yield


def variants(model: Textbook) -> dict:
    vmap_only = adaptnet.per_sample(Textbook.one)
    m = model

    def by_branch(x):
        h = m.relu(m.hidden(x))
        return adaptnet.branch(h.sum(1) > m.threshold, m.out, lambda v: m.out(-v), h)

    def masked(x):
        h = m.relu(m.hidden(x))
        return torch.where((h.sum(1) > m.threshold)[:, None], m.out(h), m.out(-h))

    def loop(x):
        return torch.stack([m.one(row) for row in x])

    def no_fast(x):
        real, _batched.rowwise = _batched.rowwise, _refuse
        try:
            return vmap_only(m, x)
        finally:
            _batched.rowwise = real

    return {"per_sample": model, "branch": by_branch, "vmap_only": no_fast, "masked": masked,
            "loop": loop}


def run(batch: int, d: int, h: int, out: int, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    model = Textbook(d, h, out)
    x = torch.randn(batch, d)
    with torch.no_grad():
        model.threshold = float(model.relu(model.hidden(x)).sum(1).median())
    fns = variants(model)
    ref = fns["loop"](x)
    for name in ("per_sample", "branch", "vmap_only", "masked"):
        torch.testing.assert_close(fns[name](x), ref, rtol=1e-4, atol=1e-5)
    calls = {k: (lambda f=f: f(x)) for k, f in fns.items()}
    counts = {k: max(1, iters // 20) if k == "loop" else iters for k in fns}
    med = medians(time_steps(calls, list(model.parameters()), rounds, counts))
    return {"batch": batch, "net": f"{d}→{h}→{out}", "rounds": rounds, "iters": iters,
            "ms": {k: v * 1e3 for k, v in med.items()},
            "per_sample_vs_branch": med["per_sample"] / med["branch"],
            "vmap_only_vs_branch": med["vmap_only"] / med["branch"],
            "masked_vs_per_sample": med["masked"] / med["per_sample"],
            "loop_vs_per_sample": med["loop"] / med["per_sample"]}


TARGETS = {"10→50→1": 1.3, "256→1024→256": 1.1}  # per_sample / branch, from the issue


def markdown(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        t, cap = r["ms"], TARGETS.get(r["net"])
        rows.append([r["net"], r["batch"], *(f"{t[k]:.3f}" for k in (
            "per_sample", "branch", "vmap_only", "masked")), f"{t['loop']:.1f}",
            f"{r['per_sample_vs_branch']:.2f}",
            f"≤ {cap}: {verdict(r['per_sample_vs_branch'] <= cap)}" if cap else "",
            f"{r['vmap_only_vs_branch']:.2f}", f"{r['masked_vs_per_sample']:.2f}",
            f"{r['loop_vs_per_sample']:.1f}",
            f"≥ 10: {verdict(r['loop_vs_per_sample'] >= 10)}"])
    r0 = result["runs"][0]
    return "\n".join([
        *table(["net", "B", "per_sample", "branch", "vmap_only", "masked", "loop",
                "per_sample / branch", "target", "vmap_only / branch", "masked / per_sample",
                "loop / per_sample", "target"], rows),
        "", f"Times in ms per forward+backward step; median of {r0['rounds']} interleaved "
            f"rounds of {r0['iters']} steps ({max(1, r0['iters'] // 20)} for the loop)."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        runs = [run(8, 4, 8, 2, args.rounds or 3, 4)]
    else:
        rounds = args.rounds or 15
        runs = [run(256, 10, 50, 1, rounds, 200), run(256, 256, 1024, 256, rounds, 40)]
    publish("per_sample", args, {"runs": runs}, markdown)


if __name__ == "__main__":
    main()
