"""`make demo` runs examples/sharing_demo.py; keep it working (on few steps)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.slow  # a fresh process
def test_timing_settles_glibc_malloc_so_activations_stop_faulting_in():
    """time_together frees one large block first: in a fresh process, three 1.3 MB blocks
    allocated and freed in turn (a 256-row CNN's activations) are often faulted in again
    on every pass (glibc trims its heap), and after it (and one warm-up pass, which
    time_together makes) never."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc: Linux")
    code = (
        "import resource, torch\n"
        "from adaptnet.study._timing import _settle_allocator\n"
        "def faults():\n"
        "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(20):\n"
        "        blocks = [torch.empty(256, 64, 20).fill_(1.0) for _ in range(3)]\n"
        "        del blocks\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start\n"
        "before = faults()\n_settle_allocator()\nfaults()\nprint(before, faults())\n")
    for _ in range(5):  # about one fresh process in three starts settled: nothing to show
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, check=True)
        before, after = map(int, done.stdout.split())
        assert after < 50, (before, after)
        if before > 10_000:  # every block faulted in again on every pass
            break
