"""The benchmark script runs and writes well-formed results (sizes tiny; no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sharing.py"


def test_bench_sharing_quick(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--out",
                    str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "sharing-quick.json").read_text())
    assert {r["case"] for r in result["overhead"]} == {
        "LM, embedding/head tie (identity)", "Autoencoder, decoder = encoderᵀ"}
    assert all(r["ratio"] > 0 for r in result["overhead"])
    assert set(result["persistence"]["formats"]) == {
        "adaptnet", "adaptnet, fsync disabled", "torch", "safetensors.save_model"}
    assert "| format |" in (tmp_path / "sharing-quick.md").read_text()
