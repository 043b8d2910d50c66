"""The README tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5
    tour = tmp_path / "tour.py"  # a file, as a user would run it (@per_sample reads source)
    tour.write_text("\n".join(blocks))
    namespace: dict = {}
    exec(compile(tour.read_text(), str(tour), "exec"), namespace)
    assert namespace["report"].collateral == ("embed.weight",)
    lm2 = namespace["lm2"]
    assert lm2.head.weight is not lm2.embed.weight  # untie=True gave head its own copy
    assert not lm2.head.weight.requires_grad and lm2.embed.weight.requires_grad
    assert namespace["y"].shape == (256, 1)
