"""adaptnet installs as a library: ranges, not pins; cheap, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installing_beside_the_pinned_stack_reinstalls_nothing(tmp_path):
    """pip resolves adaptnet (and its data/vision extras) against this venv: only adaptnet itself.

    A pyproject.toml that pinned torch to another release would make pip plan
    a multi-GB torch install here; this catches it without a second venv.
    """
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation",
         "--quiet", "--disable-pip-version-check", "--report", str(report),
         f"{ROOT}[data,vision]"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    planned = [(i["metadata"]["name"], i["metadata"]["version"])
               for i in json.loads(report.read_text())["install"]]
    assert [name for name, _ in planned] == ["adaptnet"], planned


def test_constraints_pin_what_pyproject_allows():
    """Every pin in constraints.txt is a package the project depends on (no stale pins)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values()
                                          for d in extra]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in declared}
    pins = [line.split("==")[0].lower() for line in
            (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert set(pins) == names
    assert not any("==" in d for d in declared), "pyproject.toml declares ranges, not pins"


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120).stdout


@pytest.mark.slow
def test_subpackages_load_lazily_after_a_bare_import():
    out = _run("import sys, adaptnet\n"
               "print('adaptnet.models' in sys.modules)\n"
               "adaptnet.models.build, adaptnet.data.load_dataset\n"
               "adaptnet.transfer.load_backbone\n"
               "adaptnet.recipes.load_recipe, adaptnet.report.write_report\n"
               "print('adaptnet.models' in sys.modules, 'data' in dir(adaptnet))")
    assert out.split() == ["False", "True", "True"]


@pytest.mark.slow
def test_importing_the_zoo_and_recipes_does_not_import_dynamo():
    out = _run("import sys, adaptnet.models, adaptnet.recipes, adaptnet.cli\n"
               "print('torch._dynamo' in sys.modules)")
    assert out.strip() == "False"


@pytest.mark.slow
def test_help_and_the_recipe_list_answer_without_importing_torch():
    """`import adaptnet` imports no subpackage; `adaptnet --help` and `adaptnet recipes`
    answer without torch (its import alone takes seconds); the first library name used
    imports what it needs."""
    out = _run("import sys, adaptnet\n"
               "from typer.testing import CliRunner\n"
               "from adaptnet.cli import app\n"
               "said = [CliRunner().invoke(app, a).output for a in (['--help'], ['recipes'],\n"
               "                                                    ['train', '--help'])]\n"
               "print('torch' in sys.modules, 'mnist1d-cnn' in said[1], 'recipe' in said[2])\n"
               "adaptnet.fit\n"
               "print('torch' in sys.modules, 'adaptnet.train' in sys.modules)")
    assert out.split() == ["False", "True", "True", "True", "True"]
