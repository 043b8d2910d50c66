"""Package hygiene: import has no side effects, the public API is declared once."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import adaptnet


@pytest.mark.slow
def test_import_has_no_side_effects(tmp_path):
    code = textwrap.dedent("""
        import os, torch
        env, threads = dict(os.environ), torch.get_num_threads()
        dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
        seed_state = torch.random.get_rng_state().clone()
        import adaptnet
        assert dict(os.environ) == env, "environment changed"
        assert torch.get_num_threads() == threads, "thread count changed"
        assert torch.get_default_dtype() == dtype and torch.is_grad_enabled() == grad
        assert torch.equal(torch.random.get_rng_state(), seed_state), "RNG touched"
        assert os.listdir(".") == [], "files written"
    """)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_the_top_level_holds_the_everyday_names_and_the_moved_ones_warn():
    assert len(adaptnet.__all__) == len(set(adaptnet.__all__)) <= 40
    for name, module in adaptnet._OWNER.items():  # each from its subpackage, the same object
        home = importlib.import_module(f"adaptnet.{module}")
        assert name in home.__all__ and getattr(adaptnet, name) is getattr(home, name), name
    for name, module in adaptnet._WAS.items():  # 0.1's top-level names: one release more
        home = importlib.import_module(f"adaptnet.{module}")
        with pytest.warns(DeprecationWarning,
                          match=rf"adaptnet\.{name} is now adaptnet\.{module}\.{name}; "):
            assert getattr(adaptnet, name) is getattr(home, name)
        assert name in home.__all__ and name not in adaptnet.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        adaptnet.Nope  # noqa: B018
    for name in ("Comparison", "compare_models", "time_together"):  # recipes -> study
        with pytest.warns(DeprecationWarning,
                          match=rf"adaptnet\.recipes\.{name} is now adaptnet\.study\.{name}; "):
            assert getattr(adaptnet.recipes, name) is getattr(adaptnet.study, name)
    assert adaptnet.compare is adaptnet.study.compare_models
    public = {n for n, v in vars(adaptnet).items() if not n.startswith("_")
              and (inspect.isfunction(v) or inspect.isclass(v))}
    assert public <= set(adaptnet.__all__)


def test_public_api_is_documented():
    for name in adaptnet.__all__:
        obj = getattr(adaptnet, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"adaptnet.{name} has no docstring"


def test_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    attempted = 0
    for info in pkgutil.walk_packages(adaptnet.__path__, "adaptnet."):
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"doctest failed in {info.name}"
        attempted += result.attempted
    assert attempted >= 20
    assert os.listdir(tmp_path) == []


def test_no_private_import_across_packages_and_layers_point_down():
    """``from adaptnet.<pkg>._x`` only inside ``<pkg>``; the ground floor (``adaptnet._*``,
    ``errors``) and each package's public names serve everyone else; no import goes up."""
    import ast

    src = Path(adaptnet.__file__).parent
    above = {  # a package may not import these (they sit above it in DESIGN.md's layers)
        "sharing": {"train", "recipes", "transfer", "models", "cli", "report", "data", "study"},
        "dynamic": {"train", "recipes", "transfer", "models", "cli", "report", "data", "study"},
        "init": {"train", "recipes", "transfer", "models", "cli", "report", "data", "study"},
        "train": {"recipes", "transfer", "models", "cli", "report", "study"},
        "transfer": {"recipes", "cli", "train", "study"},
        "models": {"recipes", "train", "transfer", "cli", "data", "report", "study"},
        "data": {"recipes", "train", "transfer", "models", "cli", "report", "sharing", "study"},
        "report": {"recipes", "train", "transfer", "models", "cli", "data", "sharing", "study"},
        "study": {"recipes", "cli", "transfer", "models"},
    }
    bad = []
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).parts
        home = rel[0] if len(rel) > 1 else None
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                    "adaptnet."):
                continue
            parts = node.module.split(".")
            pkg = parts[1]
            if len(parts) > 2 and parts[2].startswith("_") and pkg != home:
                bad.append(f"{'/'.join(rel)}: private {node.module}")
            if home in above and pkg in above[home]:
                bad.append(f"{'/'.join(rel)}: imports {node.module}, a layer above {home}")
    assert not bad, "\n".join(bad)


def _runs(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _import_graph() -> dict[str, set[str]]:
    """adaptnet's modules and the adaptnet modules each imports, at any depth of its code
    (a function-level import is an edge too: it closes a cycle when it runs)."""
    src = Path(adaptnet.__file__).resolve().parent.parent
    files = {".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (src / "adaptnet").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runs(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                          for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def test_no_module_imports_itself_round_a_cycle():
    graph = _import_graph()
    assert {"adaptnet.cli", "adaptnet.recipes._schema", "adaptnet.dynamic._exit"} <= set(graph)
    assert "adaptnet.recipes._trust" in graph["adaptnet.recipes._schema"]  # edges are read

    state: dict[str, str] = {}  # "open" while on the path, then "done"
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != "open", " -> ".join([*path[path.index(nxt):], nxt])
            if nxt not in state:
                visit(nxt)
        state[module] = "done"
        path.pop()

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_readme_layout_names_every_package_and_ground_floor_module():
    """README's layer picture and ownership table cover the package as it is."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    src = Path(adaptnet.__file__).parent
    names = [p.name for p in src.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    names += [p.stem for p in src.glob("_*.py") if p.stem != "__init__"] + ["errors", "cli"]
    missing = [n for n in names if n not in layout]
    assert not missing, f"README's Layout does not name {missing}"


def test_type_checkers_see_every_top_level_name():
    """The lazy top level lists each everyday name for IDEs and type checkers too (under
    TYPE_CHECKING): the same names as __all__ and the subpackages."""
    import ast

    tree = ast.parse(Path(adaptnet.__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and getattr(n.test, "id", None) == "TYPE_CHECKING")
    seen = {a.asname or a.name for n in block.body for a in n.names}
    assert seen == (set(adaptnet.__all__) - {"__version__"}) | set(adaptnet._LAZY)
