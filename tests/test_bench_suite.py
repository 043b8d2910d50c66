"""benchmarks/run.py: the suite's runner and the regeneration of BENCHMARKS.md's tables."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str, file: str):
    sys.path.insert(0, str(BENCH))  # the scripts import _common, as they do when run
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def suite():
    yield from _script("bench_suite", "run.py")


@pytest.fixture(scope="module")
def common():
    yield from _script("bench_common", "_common.py")


DOC = """# Benchmarks

Prose stays.
<!-- results/a.md -->
old table a
<!-- /results/a.md -->
More prose, with a figure: 1.23.
<!-- results/b.md -->
<!-- /results/b.md -->
"""


def test_regenerate_replaces_only_the_marked_blocks(suite, tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(DOC)
    (tmp_path / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    (tmp_path / "b.md").write_text("table b\n")
    assert suite.regenerate(doc, tmp_path) == ["a.md", "b.md"]
    text = doc.read_text()
    assert "old table a" not in text
    assert "<!-- results/a.md -->\n| x |\n|---|\n| 1 |\n<!-- /results/a.md -->" in text
    assert "<!-- results/b.md -->\ntable b\n<!-- /results/b.md -->" in text
    assert "Prose stays." in text and "More prose, with a figure: 1.23." in text
    suite.regenerate(doc, tmp_path)
    assert doc.read_text() == text  # idempotent


@pytest.mark.parametrize("case", ["missing results", "unclosed"])
def test_regenerate_refuses_and_writes_nothing(suite, tmp_path, case):
    doc = tmp_path / "BENCHMARKS.md"
    (tmp_path / "a.md").write_text("new\n")
    if case == "unclosed":
        (tmp_path / "b.md").write_text("new\n")
        doc.write_text(DOC.replace("<!-- /results/b.md -->\n", ""))
        expect = "no closing <!-- /results/b.md -->"
    else:
        doc.write_text(DOC)
        expect = r"shows \['b.md'\], which .* does not hold; run `python benchmarks/run.py b`"
    before = doc.read_text()
    with pytest.raises(SystemExit, match=expect):
        suite.regenerate(doc, tmp_path)
    assert doc.read_text() == before


def test_the_suite_lists_every_script_and_the_document_every_table(suite):
    scripts = sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py"))
    assert sorted(suite.BENCHMARKS + suite.LONG) == scripts
    shown = re.findall(r"<!-- results/([\w.-]+)\.md -->", suite.DOC.read_text())
    assert sorted(set(shown)) == sorted([*scripts, "suite"])
    for name in shown:
        assert (BENCH / "results" / f"{name}.md").is_file()
        assert (BENCH / "results" / f"{name}.json").is_file()


@pytest.mark.slow
def test_run_quick_writes_results_and_leaves_the_document_alone(tmp_path):
    before = (BENCH.parent / "BENCHMARKS.md").read_text()
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "moe", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "moe-quick.json").is_file() and not (tmp_path / "suite.json").exists()
    assert (BENCH.parent / "BENCHMARKS.md").read_text() == before


@pytest.mark.slow
def test_run_names_an_unknown_benchmark():
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "rout"], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "unknown benchmark 'rout'; choose from sharing, route" in proc.stderr


def test_train_seeds_reads_back_finished_runs_resumes_cut_ones_and_keys_by_setting(
        common, tmp_path):
    plans = {"tied": {}, "untied": {"model.tied": False}}
    over = ["train.epochs=2"]
    first = common.train_seeds("digits-tied-autoencoder", plans, over, [0], tmp_path, 64)
    assert [(r["seed"], r["variant"]) for r in first] == [(0, "tied"), (0, "untied")]
    assert first[1]["unique_params"] - first[0]["unique_params"] == 64 * 32
    done = {r["run_dir"]: Path(r["run_dir"], "results.json").stat().st_mtime_ns for r in first}
    again = common.train_seeds("digits-tied-autoencoder", plans, over, [0], tmp_path, 64)
    assert again == first  # read back, not retrained
    assert {d: Path(d, "results.json").stat().st_mtime_ns for d in done} == done
    # a run cut after its first epoch (checkpoint kept, no results) resumes from it
    cut = Path(first[0]["run_dir"])
    (cut / "results.json").unlink()
    resumed = common.train_seeds("digits-tied-autoencoder", {"tied": {}}, over, [0], tmp_path,
                                 64)
    assert resumed[0]["run_dir"] == str(cut) and resumed[0]["epochs"] == 2
    # another setting never reads this one's runs
    other = common.train_seeds("digits-tied-autoencoder", {"tied": {}}, ["train.epochs=1"], [0],
                               tmp_path, 64)
    assert other[0]["run_dir"] != str(cut) and other[0]["epochs"] == 1


def test_train_seeds_keeps_results_or_whole_runs_that_outlive_their_root(common, tmp_path):
    import shutil

    from adaptnet.recipes import load_run

    over, root, keep = ["train.epochs=1"], tmp_path / "root", tmp_path / "keep"
    first = common.train_seeds("digits-tied-autoencoder", {"tied": {}}, over, [0], root, 64,
                               keep)
    kept = keep / Path(first[0]["run_dir"]).relative_to(root)
    assert sorted(p.name for p in kept.iterdir()) == ["results.json"]
    whole = common.train_seeds("digits-tied-autoencoder", {"tied": {}}, over, [0], root, 64,
                               keep, keep_weights=True)  # weights missing there: copied now
    assert whole[0]["run_dir"] == str(kept)
    assert sorted(p.name for p in kept.iterdir()) == [
        "config.yaml", "model.safetensors", "results.json"]
    shutil.rmtree(root)  # the checkpoints are lost; the kept run is read, not retrained
    again = common.train_seeds("digits-tied-autoencoder", {"tied": {}}, over, [0], root, 64,
                               keep, keep_weights=True)
    assert again == whole and not root.exists()
    load_run(again[0]["run_dir"])
    (kept / "model.safetensors").unlink()  # a kept run without its weights trains again
    retrained = common.train_seeds("digits-tied-autoencoder", {"tied": {}}, over, [0], root, 64,
                                   keep, keep_weights=True)
    assert root.exists() and (kept / "model.safetensors").is_file()
    assert retrained[0]["run_dir"] == str(kept)
