"""Package hygiene: import has no side effects, the public API is declared once."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap

import adaptnet


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


def test_all_is_complete_and_resolves():
    assert len(adaptnet.__all__) == len(set(adaptnet.__all__))
    for name in adaptnet.__all__:
        assert hasattr(adaptnet, name), name
    for name in adaptnet.sharing.__all__:
        assert name in adaptnet.__all__, f"adaptnet.sharing.{name} is not re-exported"
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
