"""Benchmark: a Shallow-Deep Network on Fashion-MNIST, converged, three seeds, batched CPU time.

Recipe ``fashion-sdn-resnet``: a ResNet for 28×28 images (``sdn_resnet``,
widths 16/32/64, ``BLOCKS`` basic blocks per stage) with an internal
classifier after every block (Kaya et al. 2019), trained jointly from
scratch, against the same ResNet without them (``model.exits=false``), each
for ``EPOCHS`` epochs with the learning rate annealed to zero (cosine), and
stopped sooner if the validation loss has not improved for ``PATIENCE``
epochs. (With the recipe's constant rate the validation accuracy swung by
1–2 points from one epoch to the next, more than the 0.5-point tolerance, so
the final model's accuracy was mostly chance.) For each
seed the early-exit network is swept over confidence thresholds and one is
calibrated on the validation split (the cheapest within 0.5 points of the
plain network's validation accuracy); accuracy and multiply-adds are on the
10,000 test images, times are batched (``BATCH``) eval-mode passes over them,
the plain network and every threshold interleaved in the same rounds, at
each of ``THREADS`` threads. The table gives the median (min–max) over seeds.
Target at the calibrated threshold: ≥ 2× fewer multiply-adds and ≥ 1.6×
faster (at every thread count) at ≤ 0.5 points.

Runs go to ``runs/bench/sdn/``: the benchmark can be cut and run again. Each
finished run's ``config.yaml``, ``model.safetensors`` (about 1 MB) and
``results.json`` are kept in ``benchmarks/results/runs/sdn/`` (committed), and
the timing loads them from there: the six trainings, hours each on a core,
need not finish in the same session as the timing.
``--train-only`` trains (or resumes) and stops before timing, so that the
timing can run later with nothing else on the machine.

    python benchmarks/bench_sdn.py               # full (hours on 2 cores)
    python benchmarks/bench_sdn.py --train-only  # the training part only
    python benchmarks/bench_sdn.py --quick   # smoke test: 64 images, 1 epoch
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from _common import (
    RESULTS,
    annealed,
    parse_args,
    publish,
    runs_root,
    settled,
    show,
    spread,
    stopped_early,
    table,
    train_seeds,
    verdict,
)
from bench_early_exit import TARGET_MACS, TARGET_SPEED, TOLERANCE, sweep

from adaptnet.recipes import load_run

BLOCKS, SEEDS, EPOCHS, PATIENCE, BATCH, ROUNDS = 2, [0, 1, 2], 12, 3, 128, 5
THREADS = (1, 2)


def settings() -> list[str]:
    return [f"model.blocks={BLOCKS}", *annealed("fashion-sdn-resnet", EPOCHS),
            f"train.early_stopping={PATIENCE}"]


def run(seeds: list[int], overrides: list[str], root: Path, keep: Path, limit: int | None,
        rounds: int, train_only: bool = False) -> dict | None:
    plans = {"plain": {"model.exits": False}, "early exit": {"model.exits": True}}
    rows = train_seeds("fashion-sdn-resnet", plans, overrides, seeds, root, limit, keep,
                       keep_weights=True)
    if train_only:
        return None
    per_seed = []
    for seed in seeds:
        plain_row, exit_row = (next(r for r in rows if r["seed"] == seed and r["variant"] == v)
                               for v in plans)
        data, plain, _ = load_run(plain_row["run_dir"])
        net = load_run(exit_row["run_dir"])[1]
        per_seed.append({"seed": seed, "epochs": {"plain": plain_row["epochs"],
                                                  "early exit": exit_row["epochs"]},
                         "last_quarter": {"plain": settled(plain_row["history"]),
                                          "early exit": settled(exit_row["history"])},
                         "stopped_early": any(stopped_early(r["history"], PATIENCE)
                                              for r in (plain_row, exit_row)),
                         "threads": {str(t): sweep_at(t, data, plain, net, rounds)
                                     for t in THREADS}})
    params = {v: next(r["unique_params"] for r in rows if r["variant"] == v) for v in plans}
    return {"seeds": seeds, "overrides": overrides, "batch": BATCH, "params": params,
            "runs": per_seed}


def sweep_at(threads: int, data, plain, net, rounds: int) -> dict:
    torch.set_num_threads(threads)
    return sweep(data, plain, net, rounds, BATCH)


def markdown(result: dict) -> str:
    runs = result["runs"]
    first = str(THREADS[0])

    def over(get) -> dict:
        return spread([get(r) for r in runs])

    plain = [["plain (no exits)", "", show(over(lambda r: r["threads"][first]["plain"]
                                                ["accuracy"])), "",
              f"{statistics.median(r['threads'][first]['plain']['macs'] for r in runs):,.0f}",
              "1.00", *(x for t in THREADS for x in (
                  show(over(lambda r, t=t: r["threads"][str(t)]["plain"]["ms"]), ".0f"),
                  "1.00")), ""]]
    labels = [k for k in runs[0]["threads"][first]["thresholds"] if not k.startswith("calib")]
    rows = []
    for label in [*labels, "calibrated"]:
        def point(r: dict, t: int | str = first, label: str = label) -> dict:
            return next(v for k, v in r["threads"][str(t)]["thresholds"].items()
                        if k.split(" ")[0] == label)

        meets = sum(all(point(r, t)["meets"] for t in THREADS) for r in runs)
        rows.append([f"early exit, threshold {label}" + (
            f" ({show(over(lambda r: r['threads'][first]['calibration']['threshold']), '.3f')})"
            if label == "calibrated" else ""),
            " / ".join(f"{statistics.median(point(r)['exits'][i] for r in runs):.0%}"
                       for i in range(len(point(runs[0])["exits"]))),
            show(over(lambda r: point(r)["accuracy"])),
            show(over(lambda r: -point(r)["points_lost"]), "+.2f"),
            f"{statistics.median(point(r)['macs'] for r in runs):,.0f}",
            show(over(lambda r: point(r)["macs_ratio"]), ".2f"),
            *(x for t in THREADS for x in (
                show(over(lambda r, t=t: point(r, t)["ms"]), ".0f"),
                show(over(lambda r, t=t: point(r, t)["speedup"]), ".2f"))),
            f"{verdict(meets == len(runs))} ({meets}/{len(runs)} seeds)"])
    epochs = "; ".join(f"seed {r['seed']}: {r['epochs']['plain']} / {r['epochs']['early exit']}"
                       f"{' (stopped early)' if r['stopped_early'] else ''}" for r in runs)
    fall = "; ".join(f"seed {r['seed']}: {r['last_quarter']['plain']:.1%} / "
                     f"{r['last_quarter']['early exit']:.1%}" for r in runs)
    p = result["params"]
    return "\n".join([
        f"Parameters: plain {p['plain']:,}, early exit {p['early exit']:,}. Epochs (plain / "
        f"early exit): {epochs}. Validation loss fall over the last quarter of the epochs: "
        f"{fall}.", "",
        *table(["variant", "samples leaving at exit 1 / 2 / … (median)", "test accuracy",
                "points vs plain", "multiply-adds / sample (median)", "fewer MACs (×)",
                *(x for t in THREADS for x in (
                    f"ms per test pass (B={result['batch']}, {t} thread{'s' * (t > 1)})",
                    "speed-up (×)")),
                f"target (≥ {TARGET_MACS:g}× MACs, ≥ {TARGET_SPEED:g}× speed, "
                f"≤ {TOLERANCE * 100:g} points)"], plain + rows), "",
        f"Settings: {', '.join(result['overrides'])}; seeds "
        f"{', '.join(map(str, result['seeds']))}; median (min–max) over seeds; times: median "
        f"of {runs[0]['threads'][first]['rounds']} interleaved rounds per seed; the target "
        "is met in a seed when it is at every thread count."]) + "\n"


def main() -> None:
    args = parse_args(__doc__)
    root = runs_root("sdn", args)
    if args.quick:
        result = run([0], ["model.blocks=1", "train.epochs=1"], root,
                     args.out / "sdn-quick-kept", 64, args.rounds or 2, args.train_only)
    else:
        result = run(SEEDS, settings(), root, RESULTS / "runs" / "sdn", None,
                     args.rounds or ROUNDS, args.train_only)
    publish("sdn", args, result, markdown)


if __name__ == "__main__":
    main()
