"""docs/api.md lists what each namespace exports, each name once, with a one-line purpose.

It is generated from the code: `python tests/test_api_doc.py` rewrites it, and the test
below fails, saying so, when the code and the page differ. A purpose is the first line of
the name's docstring, or for a constant the ``#:`` comment above its definition.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "api.md"
NAMESPACES = ["adaptnet", "adaptnet.sharing", "adaptnet.dynamic", "adaptnet.init",
              "adaptnet.train", "adaptnet.errors", "adaptnet.data", "adaptnet.models",
              "adaptnet.transfer", "adaptnet.recipes", "adaptnet.study", "adaptnet.report",
              "adaptnet.hf"]


def purpose(namespace: str, name: str) -> str:
    module = importlib.import_module(namespace)
    if name == "__version__":
        return "The installed version."
    obj = getattr(module, name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        doc = inspect.getdoc(obj) or ""
        return " ".join(doc.split("\n\n")[0].split())
    for path in sorted(Path(module.__file__).parent.glob("*.py")):  # a constant: its #: line
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"{re.escape(name)}\b[^=]*=", line) and i and \
                    lines[i - 1].startswith("#: "):
                return lines[i - 1][3:]
    return ""


def page() -> str:
    out = ["# The public API", "",
           "What each namespace exports, each name once, with its purpose (generated from the",
           "code by `python tests/test_api_doc.py`; a test checks it). `import adaptnet` keeps",
           "the everyday verbs and classes; the rest lives in its subpackage, imported on",
           "first use. The names 0.1 had at the top level and has moved still resolve there,",
           "with a DeprecationWarning naming the new place, until 0.2.", ""]
    top = importlib.import_module("adaptnet")
    for namespace in NAMESPACES:
        names = sorted(importlib.import_module(namespace).__all__, key=str.lower)
        out += [f"## `{namespace}`", ""]
        for name in names:
            if namespace == "adaptnet" and name in top._OWNER:  # listed where it lives
                out.append(f"- `{name}`: see `adaptnet.{top._OWNER[name]}`")
            else:
                out.append(f"- `{name}`: {purpose(namespace, name)}")
        out.append("")
    moved = ", ".join(f"`{n}` → `adaptnet.{m}.{n}`" for n, m in sorted(top._WAS.items()))
    out += ["## Moved out of the top level in 0.1 (removed in 0.2)", "", moved, ""]
    return "\n".join(out)


def test_the_api_page_is_the_code_s_and_every_name_has_a_purpose():
    wanted = page()
    assert PAGE.read_text(encoding="utf-8") == wanted, \
        "docs/api.md differs from the code: run `python tests/test_api_doc.py`"
    empty = [line for line in wanted.splitlines() if re.fullmatch(r"- `\w+`: ", line)]
    assert not empty, f"exports without a purpose: {empty}"
    listed = re.findall(r"^- `(\w+)`", wanted, re.M)
    assert len(listed) == sum(len(importlib.import_module(n).__all__) for n in NAMESPACES)


if __name__ == "__main__":
    PAGE.write_text(page(), encoding="utf-8")
    sys.exit(0)


def test_the_readme_counts_the_docstring_examples_truly():
    seen: dict[int, object] = {}
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                seen[id(obj)] = obj
    examples = sum(">>>" in (inspect.getdoc(o) or "") for o in seen.values())
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"{examples} of the {len(seen)} carry a runnable example" in readme
    callable_ = [o for o in seen.values() if inspect.isfunction(o) or
                 (inspect.isclass(o) and issubclass(o, torch.nn.Module))]
    without = {o.__name__ for o in callable_ if ">>>" not in (inspect.getdoc(o) or "")}
    assert without == {"shard", "compare_variants", "flagship", "pretrain", "compare_table",
                       "write_compare"}, without  # the six README names


def test_every_export_has_a_caller_in_docs_tests_examples_or_a_docstring_example():
    """An exported name nobody uses is not API: each appears outside docs/api.md (in the
    tests, benchmarks, examples, a page of docs/, README or BENCHMARKS, or a runnable
    docstring example)."""
    texts = [p.read_text(encoding="utf-8") for d in ("tests", "benchmarks", "examples")
             for p in (ROOT / d).rglob("*.py")]
    texts += [p.read_text(encoding="utf-8") for p in [*(ROOT / "docs").glob("*.md"),
                                                      ROOT / "README.md", ROOT / "BENCHMARKS.md"]
              if p.name != "api.md"]
    texts += ["\n".join(line for line in p.read_text(encoding="utf-8").splitlines()
                        if line.strip().startswith((">>>", "...")))
              for p in (ROOT / "src" / "adaptnet").rglob("*.py")]
    used = set(re.findall(r"\w+", "\n".join(texts)))
    unused = [f"{n}.{name}" for n in NAMESPACES for name in importlib.import_module(n).__all__
              if name not in used]
    assert not unused, unused
