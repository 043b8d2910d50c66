"""Benchmark: the training engine's per-step overhead, and checkpoint time at 10M parameters.

Overhead: ``adaptnet.fit`` vs a hand-written PyTorch loop on the same model,
data, batch order and optimizer (SGD with momentum). The hand-written loop is
the usual one: shuffle, slice, forward, loss, ``zero_grad``, backward, step,
and ``running_loss += loss.item()``. The engine adds its finiteness check
(loss and gradient norm), metric accumulation and its bookkeeping; no progress
bar, no run directory. Rounds alternate which runs first; each figure is the
median seconds per step over rounds.

Checkpoints: ``write_checkpoint`` (weights via ``adaptnet.save`` + optimizer,
RNG and loop state via ``torch.save``, fsynced, renamed into place) and
``load_latest`` for a 10M-parameter MLP with Adam state, vs plain
``torch.save``/``torch.load`` of the same state dicts (no fsync).

    python benchmarks/bench_train.py            # full (about 2 minutes on 2 cores)
    python benchmarks/bench_train.py --quick    # smoke test, tiny sizes
"""

from __future__ import annotations

import itertools
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import parse_args, publish, table, verdict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptnet
from adaptnet.train._checkpoint import load_latest, write_checkpoint
from adaptnet.train._config import config_from
from adaptnet.train._loop import FitResult, _Trainer


def mlp(sizes: list[int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def hand_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int,
              lr: float) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        running = 0.0
        for idx in order.split(batch):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            running += loss.item()
            steps += 1
    return steps


def hand_loader_loop(model: nn.Module, loader: DataLoader, epochs: int, lr: float,
                     guard: bool = False) -> int:
    """The same hand-written loop, on a DataLoader; ``guard`` adds the engine's non-finite
    guard (one sum per gradient, read back with the loss; a bad step is skipped)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    params = list(model.parameters())
    steps = 0
    for _ in range(epochs):
        running = 0.0
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            value = loss.item()
            if guard and not (math.isfinite(value) and math.isfinite(float(torch.stack(
                    [p.grad.sum() for p in params]).sum()))):
                continue
            opt.step()
            running += value
            steps += 1
    return steps


def overhead(sizes: list[int], n: int, batch: int, epochs: int, rounds: int,
             loader: bool = False, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Marginal seconds per step: (time of ``epochs`` + 1 epochs - time of 1 epoch) / steps.

    The difference cancels what a run pays once (building the optimizer,
    validating the configuration), leaving the cost of a step; ``setup`` is
    the engine's one-time cost, measured as the 1-epoch time minus one
    epoch's worth of marginal steps. On a DataLoader a fourth variant runs: the
    hand-written loop with the engine's non-finite guard, which names the guard's
    share of the overhead. ``clock``: wall time, or ``time.process_time``.
    """
    torch.manual_seed(0)
    x, y = torch.randn(n, sizes[0]), torch.randint(0, sizes[-1], (n,))
    per_epoch = -(-n // batch)

    def shuffled() -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def engine(model: nn.Module, e: int) -> None:
        adaptnet.fit(model, shuffled() if loader else (x, y), loss="cross_entropy",
                     optimizer="sgd", lr=0.01, momentum=0.9, epochs=e, batch_size=batch,
                     progress=False, metrics=("loss",))

    def hand(model: nn.Module, e: int) -> None:
        if loader:
            hand_loader_loop(model, shuffled(), e, 0.01)
        else:
            hand_loop(model, x, y, e, batch, 0.01)

    def guarded(model: nn.Module, e: int) -> None:
        hand_loader_loop(model, shuffled(), e, 0.01, guard=True)

    runs = {"hand": hand, "engine": engine, **({"guarded": guarded} if loader else {}),
            "hand_again": hand}
    for fn in runs.values():  # warm-up
        fn(mlp(sizes), 1)
    times: dict[str, list[float]] = {k: [] for k in runs}
    setup: list[float] = []
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            took = []
            for e in (1, epochs + 1):
                model = mlp(sizes)
                start = clock()
                runs[name](model, e)
                took.append(clock() - start)
            step = (took[1] - took[0]) / (epochs * per_epoch)
            times[name].append(step)
            if name == "engine":
                setup.append(took[0] - step * per_epoch)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in mlp(sizes).parameters())
    return {"net": "→".join(map(str, sizes)), "params": params, "batch": batch,
            "data": "DataLoader" if loader else "tensors", "threads": torch.get_num_threads(),
            "steps_per_run": epochs * per_epoch, "rounds": rounds,
            "ms": {k: v * 1e3 for k, v in med.items()},
            "setup_ms": statistics.median(setup) * 1e3,
            "overhead": med["engine"] / med["hand"] - 1,
            "noise": med["hand_again"] / med["hand"] - 1,
            **({"guard": med["guarded"] / med["hand"] - 1,
                "beyond_guard": med["engine"] / med["guarded"] - 1} if loader else {})}


def step_overhead(sizes: list[int], batch: int, steps: int) -> dict:
    """Per-step cost, rotating one engine step and two hand-written steps, ``steps`` times.

    The engine's step (``_Trainer._step``: forward, loss, backward, the non-finite
    guard, optimizer step, metric accumulation) is driven directly, so the loops
    see the same machine state step by step: slow drifts of this shared machine
    cancel, which they do not between whole runs. Each variant has its own model,
    so each finds its weights equally cold in cache. Median over steps.
    """
    torch.manual_seed(0)
    x, y = torch.randn(steps * batch, sizes[0]), torch.randint(0, sizes[-1], (steps * batch,))
    engine_model = mlp(sizes)
    trainer = _Trainer(engine_model, config_from(None, {
        "loss": "cross_entropy", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
        "metrics": ("loss",)}), None)
    trainer._setup()
    trainer.net, trainer.slots = engine_model, torch.zeros(4, dtype=torch.float64).unbind()
    pos, result = {"step": 0, "epoch": 0}, FitResult()

    def hand_step() -> Callable[[torch.Tensor, torch.Tensor], None]:
        model = mlp(sizes)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        running = 0.0

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            nonlocal running
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            running += loss.item()
        return step

    def engine(xb: torch.Tensor, yb: torch.Tensor) -> None:
        trainer._step(xb, yb, pos, result)

    runs = {"hand": hand_step(), "engine": engine, "hand_again": hand_step()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(steps):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        for name in names[i % 3:] + names[:i % 3]:
            start = time.perf_counter()
            runs[name](xb, yb)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v[10:]) for k, v in times.items()}  # after warm-up
    return {"net": "→".join(map(str, sizes)), "steps": steps,
            "ms": {k: v * 1e3 for k, v in med.items()},
            "overhead": med["engine"] / med["hand"] - 1,
            "noise": med["hand_again"] / med["hand"] - 1}


def checkpoints(width: int, rounds: int) -> dict:
    model = mlp([width, width, width // 4])
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()  # fills Adam's two moments: 3x the parameters in total
    state = {"optimizer": opt.state_dict(), "rng_torch": torch.get_rng_state(), "step": 1,
             "epoch": 0, "batch": 1, "best": float("inf"), "bad_epochs": 0, "skipped": 0,
             "order": None,
             "history": [], "acc": torch.zeros(4, dtype=torch.float64), "scheduler": None,
             "rng_python": random.getstate(), "rng_cuda": []}  # what fit() checkpoints
    times: dict[str, list[float]] = {k: [] for k in ("save", "restore", "torch.save",
                                                      "torch.load")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            run_dir = Path(tmp) / f"run{r}"
            start = time.perf_counter()
            write_checkpoint(run_dir, 1, model, state, keep=2)
            times["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load_latest(run_dir, model)
            times["restore"].append(time.perf_counter() - start)
            plain = Path(tmp) / f"plain{r}.pt"
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), **state}, plain)
            times["torch.save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = torch.load(plain, weights_only=True)
            model.load_state_dict(loaded["model"])
            times["torch.load"].append(time.perf_counter() - start)
    return {"params": params, "rounds": rounds,
            "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}}


def markdown(result: dict) -> str:
    steps = [[r["net"], r["steps"], f"{r['ms']['hand']:.3f}", f"{r['ms']['engine']:.3f}",
              f"{100 * r['overhead']:+.1f}%", verdict(r["overhead"] <= 0.03),
              f"{100 * r['noise']:+.1f}%"] for r in result["step_by_step"]]
    whole = [[r["net"], f"{r['params']:,}", r["batch"], f"{r['ms']['hand']:.3f}",
              f"{r['ms']['engine']:.3f}", f"{100 * r['overhead']:+.1f}%",
              f"{100 * r['noise']:+.1f}%"] for r in result["overhead"]]
    loaders = [[r["net"], r["threads"], r.get("clock", "wall"), f"{r['ms']['hand']:.3f}",
                f"{r['ms']['engine']:.3f}", f"{100 * r['overhead']:+.1f}%",
                verdict(r["overhead"] <= 0.03), f"{100 * r['guard']:+.1f}%",
                f"{100 * r['beyond_guard']:+.1f}%", f"{100 * r['noise']:+.1f}%"]
               for r in result.get("loader", [])]
    r0 = result["overhead"][0]
    c = result["checkpoint"]["ms"]
    return "\n".join([
        "**Step by step** (the figure to read): one engine step (`_Trainer._step`, what `fit` "
        "runs per batch) and two hand-written steps, each with its own model, rotating on the "
        "same batches; median over steps. The second hand-written loop is the noise floor.", "",
        *table(["net", "steps", "hand-written ms/step", "engine ms/step", "overhead",
                "target ≤ 3%", "hand-written again (noise)"], steps), "",
        f"**Whole `fit` runs**: a run of 1 + k epochs minus a run of 1 epoch, "
        f"{r0['steps_per_run']} steps apart; median of {r0['rounds']} rotating rounds. "
        "One-time engine setup per `fit` call: "
        + ", ".join(f"{r['setup_ms']:.1f} ms ({r['net']})" for r in result["overhead"]) + ".",
        "",
        *table(["net", "params", "batch", "hand-written ms/step", "engine ms/step", "overhead",
                "hand-written again (noise)"], whole), "",
        "**On a `DataLoader`** (`shuffle=True`, batch 128, the user's loader given to `fit` "
        "and iterated by the hand-written loop alike): whole runs as above, at 1 thread (one "
        "pinned core) and 2, each timed by wall clock and by the process's CPU time. *Guard*: "
        "the hand-written loop with the engine's non-finite guard added (one sum per "
        "gradient, read back once) against the plain hand-written loop; *beyond the guard*: "
        "the engine against that guarded loop.", "",
        *table(["net", "threads", "clock", "hand-written ms/step", "engine ms/step",
                "overhead", "target ≤ 3%", "guard", "beyond the guard",
                "hand-written again (noise)"], loaders), "",
        *table([f"checkpoint, {result['checkpoint']['params']:,} params + Adam state",
                "adaptnet save", "adaptnet restore", "torch.save", "torch.load"],
               [[f"ms (median of {result['checkpoint']['rounds']})", f"{c['save']:.0f}",
                 f"{c['restore']:.0f}", f"{c['torch.save']:.0f}", f"{c['torch.load']:.0f}"]]),
    ]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        runs = [overhead([8, 16, 3], 64, 16, 2, args.rounds or 3)]
        ckpt = checkpoints(64, args.rounds or 2)
    else:
        rounds = args.rounds or 21
        runs = [overhead([784, 512, 512, 10], 4096, 128, 2, rounds),
                overhead([10, 50, 2], 4096, 128, 2, rounds)]
        ckpt = checkpoints(2850, 5)
    loaders = []
    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    for t in (1, 2):  # at 1 thread on one pinned core, with CPU time beside wall time
        torch.set_num_threads(t)
        if t == 1 and len(cores) > 1:
            os.sched_setaffinity(0, {min(cores)})
        for clock in (time.perf_counter, time.process_time):
            loaders.append(overhead([8, 16, 3], 64, 16, 2, args.rounds or 3, loader=True,
                                    clock=clock) if args.quick else
                           overhead([784, 512, 512, 10], 4096, 128, 2, args.rounds or 31,
                                    loader=True, clock=clock))
            loaders[-1]["clock"] = "CPU" if clock is time.process_time else "wall"
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    sizes = [[8, 16, 3]] if args.quick else [[784, 512, 512, 10], [10, 50, 2]]
    steps = [step_overhead(s, 16 if args.quick else 128, 30 if args.quick else 1500)
             for s in sizes]
    publish("train", args, {"overhead": runs, "loader": loaders, "step_by_step": steps,
                            "checkpoint": ckpt}, markdown)


if __name__ == "__main__":
    main()
