"""The benchmark script runs and writes well-formed results (sizes tiny; no timing asserted)."""

from __future__ import annotations

import fcntl
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from adaptnet.data import FASHION_MNIST_DIR

pytestmark = pytest.mark.slow  # every test runs a benchmark script in a subprocess

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_sharing_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_sharing.py"), "--quick", "--rounds", "1",
                    "--out",
                    str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "sharing-quick.json").read_text())
    assert {r["case"] for r in result["overhead"]} == {
        "LM, embedding/head tie (identity)", "Autoencoder, decoder = encoderᵀ"}
    for r in result["overhead"]:  # the ratio is of the medians it reports
        assert r["ratio"] == pytest.approx(r["adaptnet_ms"] / r["hand_ms"])
    assert set(result["persistence"]["formats"]) == {
        "adaptnet", "adaptnet, fsync disabled", "torch", "safetensors.save_model"}
    assert "| format |" in (tmp_path / "sharing-quick.md").read_text()


def test_bench_route_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_route.py"), "--quick", "--rounds", "1",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    [run] = json.loads((tmp_path / "route-quick.json").read_text())["runs"]
    assert set(run["ms"]) == {"static", "branch", "hand", "masked", "loop"}
    _ratios(run, branch_vs_static=("branch", "static"), loop_vs_branch=("loop", "branch"))


def test_bench_depth_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_depth.py"), "--quick", "--rounds", "1",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    run = json.loads((tmp_path / "depth-quick.json").read_text())["run"]
    assert set(run["ms"]) == {"adaptive", "hand", "full", "fixed", "masked"}
    assert 0 < run["mean_over_max"] < 1


def test_bench_moe_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_moe.py"), "--quick", "--rounds", "1",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    run = json.loads((tmp_path / "moe-quick.json").read_text())["run"]
    assert set(run["ms"]) == {"moe", "dense"} and run["target"] == 1.3 * 2 / 8
    _ratios(run, moe_vs_dense=("moe", "dense"))


def test_bench_per_sample_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_per_sample.py"), "--quick", "--rounds",
                    "1", "--out", str(tmp_path)], check=True, capture_output=True)
    [run] = json.loads((tmp_path / "per_sample-quick.json").read_text())["runs"]
    assert set(run["ms"]) == {"per_sample", "branch", "vmap_only", "masked", "loop"}
    _ratios(run, per_sample_vs_branch=("per_sample", "branch"),
            loop_vs_per_sample=("loop", "per_sample"))


def test_bench_train_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--quick", "--rounds", "1",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "train-quick.json").read_text())
    [run] = result["overhead"]
    # setup_ms is a difference of two timings: noise can make it negative, but not larger
    # than a whole one-epoch run's time
    assert set(run["ms"]) == {"hand", "engine", "hand_again"}
    ms = run["ms"]
    assert run["overhead"] == pytest.approx(ms["engine"] / ms["hand"] - 1)
    assert run["noise"] == pytest.approx(ms["hand_again"] / ms["hand"] - 1)
    assert abs(run["setup_ms"]) < 1e3 * 60
    assert set(result["checkpoint"]["ms"]) == {"save", "restore", "torch.save", "torch.load"}
    [step] = result["step_by_step"]
    assert set(step["ms"]) == {"hand", "engine", "hand_again"} and step["steps"] == 30
    assert [(r["data"], r["threads"], r["clock"]) for r in result["loader"]] == [
        ("DataLoader", t, c) for t in (1, 2) for c in ("wall", "CPU")]
    for r in result["loader"]:  # the guard's share and the rest multiply to the whole
        ms = r["ms"]
        assert set(ms) == {"hand", "engine", "guarded", "hand_again"}
        assert r["guard"] == pytest.approx(ms["guarded"] / ms["hand"] - 1)
        assert r["beyond_guard"] == pytest.approx(ms["engine"] / ms["guarded"] - 1)
        assert (1 + r["guard"]) * (1 + r["beyond_guard"]) == pytest.approx(1 + r["overhead"])


def test_bench_fsdp_quick(tmp_path):
    result = _quick("fsdp", tmp_path)
    ms = result["ms"]
    assert set(ms) == {"ddp", "fsdp"} and all(v > 0 for v in ms.values())
    # the table's ratio column is FSDP's median over DDP's
    assert f"| {ms['fsdp'] / ms['ddp']:.2f}×" in (tmp_path / "fsdp-quick.md").read_text()


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                    reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (apt-get install "
                    "dataset-fashion-mnist)")
def test_bench_earlyon_quick(tmp_path):
    """earlyon (the bench extra, installed by make) and adaptnet run the same weights: an
    untrained-enough network sends every sample to the same exit under both."""
    result = _quick("earlyon", tmp_path)
    assert set(result["timing"]) == {"1", "2"}
    assert set(result["timing"]["1"]) == {"32", "256"}
    assert result["same_exit"] > 0.99 and result["same_prediction"] > 0.99
    assert sum(result["adaptnet_exits"]) == result["images"] == 256
    assert "| threads | batch | plain ms |" in (tmp_path / "earlyon-quick.md").read_text()


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                    reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (apt-get install "
                    "dataset-fashion-mnist)")
def test_bench_transfer_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_transfer.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "transfer-quick.json").read_text())
    assert [s["variant"] for s in result["summary"]][::5] == [
        "frozen backbone, new head", "from scratch"]
    assert result["summary"][0]["trainable"] == 84 * 5 + 5
    assert len(result["runs"]) == 6 and "| 5 | from scratch |" in (
        tmp_path / "transfer-quick.md").read_text()


def _ratios(run: dict, **ratios: tuple[str, str]) -> None:
    """Each named ratio in ``run`` is the quotient of the two medians (``run["ms"]``) it names."""
    for key, (top, bottom) in ratios.items():
        assert run[key] == pytest.approx(run["ms"][top] / run["ms"][bottom]), key


def _quick(name: str, tmp_path: Path) -> dict:
    subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True)
    text = (tmp_path / f"{name}-quick.md").read_text()
    assert text.startswith(f"Command: `python benchmarks/bench_{name}.py --quick`")
    return json.loads((tmp_path / f"{name}-quick.json").read_text())


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                    reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (apt-get install "
                    "dataset-fashion-mnist)")
def test_bench_early_exit_quick(tmp_path):
    result = _quick("early_exit", tmp_path)
    assert [t["task"] for t in result["tasks"]] == ["Fashion-MNIST", "MNIST-1D"]
    for task in result["tasks"]:
        points = task["thresholds"]
        assert len(points) == 8 and any(k.startswith("calibrated") for k in points)
        for p in points.values():
            assert len(p["exits"]) == 4 and abs(sum(p["exits"]) - 1) < 1e-9
            assert p["macs_ratio"] == pytest.approx(task["plain"]["macs"] / p["macs"])


def test_bench_mnist1d_quick(tmp_path):
    result = _quick("mnist1d", tmp_path)
    assert [m["model"] for m in result["models"]] == ["logreg", "mlp", "cnn", "gru"]
    assert [m["unique_params"] for m in result["models"]] == [410, 15_210, 5_210, 5_134]
    assert [(g["width"], g["unique_params"]) for g in result["gap"]] == [
        (100, 15_210), (100, 15_210), (256, 78_858), (256, 78_858)]


def test_bench_albert_quick(tmp_path):
    modes = _quick("albert", tmp_path)["modes"]
    assert list(modes) == ["none", "attention", "ffn", "all", "cycle", "sequence"]
    assert all(v["train_perplexity_at_best"]["median"] > 1 for v in modes.values())
    enc = {m: v["encoder_params"] for m, v in modes.items()}
    # four distinct blocks hold exactly four times what the all-shared stack holds, and
    # the two orders of two blocks twice
    assert enc["none"] == 4 * enc["all"] and enc["cycle"] == enc["sequence"] == 2 * enc["all"]
    assert enc["all"] < enc["attention"] < enc["none"] and enc["all"] < enc["ffn"] < enc["none"]


def test_bench_lm_tying_quick(tmp_path):
    [width] = _quick("lm_tying", tmp_path)["lm"]
    tied, untied = width["variants"]["tied"], width["variants"]["untied"]
    # width 16, vocabulary 200: the tie saves the 200 x 16 output matrix
    assert untied["unique_params"] - tied["unique_params"] == 200 * 16
    assert tied["test_perplexity"]["median"] > 1 and tied["epochs"]["median"] == 2
    # the kept results.json files stand for the finished runs once their directories
    # (checkpoints, weights: what git ignores) are gone: nothing is trained again
    kept = sorted((tmp_path / "lm_tying-quick-kept").rglob("results.json"))
    assert len(kept) == 2
    runs = tmp_path / "lm_tying-quick-runs"
    shutil.rmtree(runs)
    assert _quick("lm_tying", tmp_path)["lm"] == [width] and not runs.exists()


def test_bench_autoencoder_quick(tmp_path):
    variants = _quick("autoencoder", tmp_path)["variants"]
    assert variants["untied"]["unique_params"] - variants["tied"]["unique_params"] == 64 * 32
    assert all(v["test_mse"]["median"] > 0 for v in variants.values())


def test_bench_tokens_trains_first_times_later_and_keeps_each_seed(tmp_path):
    """--train-only trains and publishes nothing, skipping a run another process holds; the
    next run reads the finished runs back (no checkpoint written again, the logs as they
    were), times every seed's models against the same seed's vanilla and keeps each seed's
    figures, which a later run reads without the runs."""
    script = [sys.executable, str(BENCH / "bench_tokens.py"), "--quick", "--out", str(tmp_path)]
    subprocess.run([*script, "--train-only"], check=True, capture_output=True)
    assert not (tmp_path / "tokens-quick.json").exists()
    runs = tmp_path / "tokens-quick-runs"
    logs = sorted(runs.glob("*/seed-0/metrics.jsonl"))
    assert len(logs) == 4  # one row per validation point:
    assert all(len(log.read_text().splitlines()) == 8 for log in logs)
    mod = next(runs.glob("MoD-*/seed-0"))
    shutil.rmtree(mod)
    mod.mkdir()
    with open(mod / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        out = subprocess.run([*script, "--train-only"], check=True, capture_output=True,
                             text=True).stdout
    assert "MoD 0: another process is training it; skipped" in out
    assert not (mod / "metrics.jsonl").exists()
    subprocess.run([*script, "--train-only"], check=True, capture_output=True)

    def state() -> tuple[dict, list[str]]:
        return ({f: f.stat().st_mtime_ns for f in runs.rglob("checkpoints/*/*")},
                [log.read_text() for log in logs])

    before = state()
    assert len(before[0]) == 4 * 2 * 3  # two checkpoints kept per run, three files each
    result = _quick("tokens", tmp_path)
    assert state() == before
    assert list(result["rows"]) == ["vanilla", "MoD", "MoR", "early exit"]
    assert result["rows"]["vanilla"]["vs_vanilla"]["median"] == 0
    assert all(len(r["curve"]) == len(r["train_curve"]) == 8
               for runs in result["runs"].values() for r in runs)
    assert result["rows"]["vanilla"]["best_vs_vanilla"]["median"] == 0
    assert all(row["best_valid_perplexity"]["median"] == min(r["curve"])
               for row, [r] in zip(result["rows"].values(), result["runs"].values(), strict=True))
    vanilla = result["decode"]["1"]["vanilla@1"]
    assert vanilla["vs_vanilla"]["median"] == 1 and vanilla["tokens_per_s"]["median"] > 0
    [kept] = (tmp_path / "tokens-quick-kept").glob("*/seed-0.json")
    # Routed by the causal predictors: the reported (end-of-run) perplexity.
    routed = json.loads(kept.read_text())["routing_perplexity"]
    assert routed["vanilla"] is None and result["rows"]["vanilla"]["causal_routing_cost"] is None
    for name in ("MoD", "MoR"):
        [run] = result["runs"][name]
        assert routed[name]["causal"] == pytest.approx(run["curve"][-1], rel=1e-5)
        assert result["rows"][name]["causal_routing_cost"]["median"] == pytest.approx(
            routed[name]["causal"] / routed[name]["top_k"] - 1)
    shutil.rmtree(runs)
    again = _quick("tokens", tmp_path)
    assert again["rows"] == result["rows"] and again["decode"] == result["decode"]
    assert not runs.exists()
    # A run lowest mid-way: "lowest" is that point, "at the end" still the last one.
    seed = json.loads(kept.read_text())
    end = seed["runs"]["MoR"]["curve"][-1]
    seed["runs"]["MoR"]["curve"][2] = end / 2
    kept.write_text(json.dumps(seed))
    dipped = _quick("tokens", tmp_path)["rows"]["MoR"]
    assert dipped["best_valid_perplexity"]["median"] == end / 2
    assert dipped["valid_perplexity"]["median"] == end
    there = seed["runs"]["MoR"]["train_curve"][2]  # the training perplexity at that point
    assert f"| 3/8 | {there:.3f} | {end / 2 / there:.2f} |" in (
        tmp_path / "tokens-quick.md").read_text()


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                    reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (apt-get install "
                    "dataset-fashion-mnist)")
def test_bench_sdn_quick(tmp_path):
    """Trained with --train-only first (nothing published), then timed from the kept runs."""
    subprocess.run([sys.executable, str(BENCH / "bench_sdn.py"), "--quick", "--train-only",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    assert not (tmp_path / "sdn-quick.json").exists()
    assert len(list((tmp_path / "sdn-quick-runs").glob("*/seed-0/results.json"))) == 2
    done = sorted((tmp_path / "sdn-quick-kept").glob("*/seed-0/*"))
    assert [f.name for f in done] == ["config.yaml", "model.safetensors", "results.json"] * 2
    written = [f.stat().st_mtime_ns for f in done]
    shutil.rmtree(tmp_path / "sdn-quick-runs")  # checkpoints lost: the timing needs none
    result = _quick("sdn", tmp_path)
    assert [f.stat().st_mtime_ns for f in done] == written
    [run] = result["runs"]
    assert set(result["params"]) == {"plain", "early exit"} and result["batch"] == 128
    assert list(run["threads"]) == ["1", "2"]
    points = run["threads"]["2"]["thresholds"]
    assert len(points) == 8 and any(k.startswith("calibrated") for k in points)
    assert all(len(p["exits"]) == 3 for p in points.values())  # one block per stage
    assert all(p["ms"] > 0 for p in points.values())


def test_bench_ponder_quick(tmp_path):
    variants = _quick("ponder", tmp_path)["variants"]
    assert list(variants) == ["PonderNet", "ACT"]
    assert all(1 <= v["steps"]["median"] <= 20 for v in variants.values())


def test_bench_lean_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_lean.py"), "--quick", "--rounds", "1",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    runs = json.loads((tmp_path / "lean-quick.json").read_text())["runs"]
    assert [r["threads"] for r in runs] == [1, 2]
    for r in runs:
        e = r["early_exit"]
        assert r["branch"][0]["branch_vs_hand"] > 0
        assert e["exit_vs_hand"] == pytest.approx(e["us"]["EarlyExit"] / e["us"]["hand"])
        assert e["cpu_exit_vs_hand"] == pytest.approx(e["cpu_us"]["EarlyExit"] /
                                                      e["cpu_us"]["hand"])
        # the same ATen work, give or take the allocation of the output
        assert abs(e["aten_ops"]["EarlyExit"] - e["aten_ops"]["hand"]) <= 3
        assert set(r["compiled"]) == {"mlp", "early exit"}
    assert "EarlyExit / hand" in (tmp_path / "lean-quick.md").read_text()


def test_bench_demo_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_demo.py"), "--quick", "--rounds", "1",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "demo-quick.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["plain CNN", "early-exit CNN"]
    assert all(len(v) == 4 for v in result["repeats"].values())
    assert all(len(v) == 3 for v in result["by_hand"].values())  # one per repeat
    assert set(result["alone"]) == {"1", "2"} and all(v > 0 for v in result["alone"].values())
    assert all(set(row) == {"256", "64", "32", "16"} for row in result["conv_us"].values())
    text = (tmp_path / "demo-quick.md").read_text()
    plain, fast = result["rows"]
    for t, values in result["repeats"].items():  # clock efficiency: median / MAC reduction
        efficiency = statistics.median(values) / (plain["macs"] / fast["macs"])
        assert f"| {efficiency:.2f} (" in text, (t, efficiency)
    assert "max / min" in text


def test_bench_adaptive_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "bench_adaptive.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True)
    runs = json.loads((tmp_path / "adaptive-quick.json").read_text())["runs"]
    assert [r["recipe"] for r in runs] == ["digits-adaptive-depth", "parity-pondernet",
                                           "mnist1d-early-exit", "fashion-early-exit"]
    done = [r for r in runs if "skipped" not in r]
    assert all(0 < r.get("fraction", 1) <= 1 and 0 <= r.get("early", 0) <= 1 for r in done)
    assert FASHION_MNIST_DIR.is_dir() or "skipped" in runs[-1]


def test_bench_decode_quick_checks_the_hand_written_tokens_and_reports_every_variant(tmp_path):
    result = _quick("decode", tmp_path)
    (res,) = result["widths"].values()
    assert set(res["macs"]) == {"vanilla", "MoD", "MoR", "exit"}
    assert res["macs"]["MoD"] < res["macs"]["vanilla"]  # the routed blocks were skipped
    assert set(res["timing"]) == {"1@1", "1@2", "2@1", "2@2"}
    assert set(res["timing"]["1@1"]) == {"vanilla", "MoD", "MoR", "exit", "hand", "hand MoD"}
    assert "| clock efficiency |" in (tmp_path / "decode-quick.md").read_text()


def test_bench_hf_quick(tmp_path):
    """adaptnet and economize on one Hugging Face Llama: adaptnet's dense decoding keeps the
    model's tokens, and both libraries' MoD and exits skipped layer work while decoding."""
    pytest.importorskip("economize")
    subprocess.run([sys.executable, str(BENCH / "bench_hf.py"), "--quick", "--rounds", "1",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    r = json.loads((tmp_path / "hf-quick.json").read_text())
    assert r["agreement"]["adaptnet dense"] == 1.0 and r["share"]["adaptnet dense"] == 1.0
    for name in ("adaptnet MoD", "economize MoD", "adaptnet exit", "economize CALM"):
        assert 0.0 < r["share"][name] < 1.0, (name, r["share"][name])
    assert r["macs"]["adaptnet MoD"] < r["macs"]["adaptnet dense"]
    assert set(r["timing"]) == {"1@1", "1@2", "2@1", "2@2"}
    assert "| adaptnet / economize |" in (tmp_path / "hf-quick.md").read_text()


def test_bench_moe_peers_quick(tmp_path):
    result = _quick("moe_peers", tmp_path)
    assert [(r["threads"], r["tokens"]) for r in result["rows"]] == [(1, 32), (2, 32)]
    names = {"adaptnet", "adaptnet loop", "hf eager", "hf grouped_mm", "hand grouped"}
    text = (tmp_path / "moe_peers-quick.md").read_text()
    for r in result["rows"]:
        for mode in ("forward", "forward+backward"):
            ms = r[mode]
            assert set(ms) == names and all(v > 0 for v in ms.values())
            # the table's brackets are the quotients of the medians it reports
            ratio = ms["hand grouped"] / ms["adaptnet"]
            assert f"{ms['hand grouped']:.2f} ({ratio:.2f}×)" in text
