"""The flagship: a plain CNN and its early-exit twin, trained alike, timed side by side.

Both networks come from one recipe (``mnist1d-early-exit``), with the same
seed, optimizer and epochs; the early-exit network is the plain one with an
exit after every stage, trained on BranchyNet's joint loss. Its threshold is
then calibrated on the *validation* split (never the test split): the cheapest
threshold whose validation accuracy is within ``TOLERANCE`` of the plain
network's. Test accuracy, executed multiply-adds and batched inference time
(both networks in the same rounds, at 1 and at 2 threads) are then measured.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adaptnet import _rundir, sharing
from adaptnet._io import atomic_path
from adaptnet.dynamic import EarlyExit, calibrate_exits
from adaptnet.errors import DynamicError
from adaptnet.recipes._compare import compare_variants
from adaptnet.recipes._prepare import load_run
from adaptnet.report import markdown_table
from adaptnet.study import time_together
from adaptnet.train import evaluate

RECIPE = "mnist1d-early-exit"
PLANS = {"plain CNN": {"model.exits": False}, "early-exit CNN": {"model.exits": True}}
TOLERANCE = 0.003  # validation accuracy the calibrated threshold may give up
THREADS = (1, 2)


@dataclass(frozen=True)
class DemoRow:
    """One network of the demo, measured on the test split."""

    variant: str
    params: int
    accuracy: float
    macs: float
    ms_per_1k: dict[int, float]  # threads -> batched (256) inference, ms per 1,000 samples
    exit_shares: tuple[float, ...] = ()


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[DemoRow, DemoRow]
    threshold: float  # calibrated on the validation split
    valid_accuracy: tuple[float, float]  # plain, early exit (calibrated)
    runs: tuple[Path, Path]  # the two run directories, plain first

    title = ("MNIST-1D test split; batched (256) CPU inference, ms per 1,000 samples at 1 "
             "and 2 threads (T)")

    @property
    def speedup(self) -> dict[int, float]:
        plain, fast = self.rows
        return {t: plain.ms_per_1k[t] / fast.ms_per_1k[t] for t in plain.ms_per_1k}

    def table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        """The header and rows the demo prints and writes into its ``report.md``."""
        header = ("network", "params", "accuracy", "MACs/sample",
                  *(f"ms/1k, {t}T" for t in THREADS))
        rows = [(r.variant, f"{r.params:,}", f"{100 * r.accuracy:.1f}%", f"{r.macs:,.0f}",
                 *(f"{r.ms_per_1k[t]:.1f}" for t in THREADS)) for r in self.rows]
        return header, rows

    def summary(self) -> list[str]:
        """What the calibrated early exit bought, in two sentences (printed, and in
        ``report.md``)."""
        plain, fast = self.rows
        shares = " / ".join(f"{100 * s:.0f}%" for s in fast.exit_shares)
        speed = ", ".join(f"{v:.2f}x at {t} thread{'s' if t > 1 else ''}"
                          for t, v in sorted(self.speedup.items()))
        return [f"early exit: {speed} faster, {plain.macs / fast.macs:.2f}x fewer "
                f"multiply-adds per sample, accuracy "
                f"{100 * (fast.accuracy - plain.accuracy):+.1f} points.",
                f"threshold {self.threshold:.3f}, calibrated on the validation split; samples "
                f"leaving at exit 1 / 2 / ...: {shares}."]


def flagship(out: Path, limit: int | None = None, rounds: int = 21) -> DemoResult:
    """Train, calibrate and measure the demo's two networks into ``out``; see the module doc."""
    trained = compare_variants(RECIPE, PLANS, [], out, limit=limit)
    data, plain, _ = load_run(trained[0]["run_dir"])
    _, net, _ = load_run(trained[1]["run_dir"])
    exits = next(m for m in net.modules() if isinstance(m, EarlyExit))
    x_val, y_val = data.valid.tensors
    plain_valid = evaluate(plain, data.valid, loss="cross_entropy",
                           metrics=("accuracy",))["accuracy"]
    inputs = _inputs_of(exits, net, x_val)
    try:
        cal = calibrate_exits(exits, inputs, y_val, target_accuracy=max(plain_valid - TOLERANCE,
                                                                         1e-6))
        threshold, valid = cal.threshold, cal.accuracy
    except DynamicError:  # no threshold comes that close: never exit early
        exits.set_thresholds(1.0)
        threshold = 1.0
        valid = evaluate(net, data.valid, loss="cross_entropy",
                         metrics=("accuracy",))["accuracy"]
    x = data.test.tensors[0][:1024]
    times: dict[str, dict[int, float]] = {"plain": {}, "exit": {}}
    before = torch.get_num_threads()
    try:
        for t in THREADS:
            torch.set_num_threads(t)
            got = time_together({"plain": plain, "exit": net}, x, rounds)
            for k in times:
                times[k][t] = got[k]
    finally:
        torch.set_num_threads(before)
    rows = []
    for label, model, key in (("plain CNN", plain, "plain"), ("early-exit CNN", net, "exit")):
        test = evaluate(model, data.test, loss="cross_entropy",
                        metrics=("accuracy", "macs", "exits"))
        shares = tuple(test.get("exits", {}).values())
        rows.append(DemoRow(label, sharing.summary(model).unique, test["accuracy"],
                            test["macs"], times[key], shares))
    result = DemoResult((rows[0], rows[1]), threshold, (plain_valid, valid),
                        (Path(trained[0]["run_dir"]), Path(trained[1]["run_dir"])))
    with atomic_path(out / "demo.json") as tmp:
        tmp.write_text(json.dumps({**asdict(result), "speedup": result.speedup}, indent=1,
                                  default=str) + "\n")
    header, cells = result.table()
    runs = ", ".join(f"[{r.variant}]({run.name}/report.md)"
                     for r, run in zip(result.rows, result.runs, strict=True))
    with atomic_path(out / _rundir.REPORT) as tmp:
        tmp.write_text("\n".join([
            f"# adaptnet demo: {result.title}", "", *markdown_table(header, cells), "",
            *result.summary(), "",
            f"Each network's training run: {runs} (the early-exit run's own report shows it "
            "at the recipe's threshold, before this calibration).", ""]), encoding="utf-8")
    return result



def _inputs_of(module: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``module`` receives when ``model`` runs on ``x`` (captured by a pre-hook)."""
    seen: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return seen[0]

