"""`make demo` runs examples/sharing_demo.py; keep it working (on few steps)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

from rich.console import Console

DEMO = Path(__file__).resolve().parents[1] / "examples" / "sharing_demo.py"


def test_demo_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("sharing_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = io.StringIO()
    result = demo.main(steps=40, out=tmp_path, console=Console(file=out, width=100))
    assert result["restored"] and result["identical"]
    assert result["last_loss"] < result["first_loss"]
    assert result["retied"] == ["head.weight"] and result["lm_unique"] == 16_272
    assert (tmp_path / "autoencoder.safetensors").is_file()
    assert "weight = encoder.weightᵀ" in out.getvalue()
