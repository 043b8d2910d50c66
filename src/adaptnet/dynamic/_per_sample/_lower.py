"""Lowering: a function's AST becomes straight-line segments and control nodes.

Simple statements are grouped into *segments*; each segment is compiled into
a function of the locals it reads that returns ``locals()``, so the runtime can
carry live variables between segments explicitly. Every ``if``, ``while``,
``for``, ``return``, ``break`` and ``continue`` becomes a node the runtime
executes by partitioning the batch (``_run.py``). A test, loop iterable or
return value is computed as an assignment to a temporary at the end of the
segment before it, so it costs no extra batched call.

Generated code keeps the user's line numbers and file name, so tracebacks
point at the user's source.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adaptnet.errors import PerSampleError

__all__ = ["For", "If", "Jump", "Program", "Return", "Seg", "While", "lower"]

RESULT = "__an_result"
ITEM = "__an_item"
_UNBOUND, _LOCALS = "__an_unbound", "__an_locals"
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_CONTROL = (ast.If, ast.While, ast.For, ast.AsyncFor, ast.Return, ast.Break, ast.Continue)


@dataclass
class Seg:
    """Straight-line statements, compiled into ``Program.fns[index]``."""

    index: int
    inputs: tuple[str, ...]  # the locals it reads, in parameter order
    writes: frozenset[str]  # the locals it may bind or unbind
    lineno: int


@dataclass
class If:
    cond: str
    body: list
    orelse: list
    lineno: int


@dataclass
class While:
    cond: str
    body: list  # ends by re-computing ``cond``
    cond_seg: Seg  # computes ``cond`` alone, for samples that ``continue``
    lineno: int


@dataclass
class For:
    items: str
    target: Seg | str  # a plain name, or a segment assigning ITEM to the target
    body: list
    lineno: int


@dataclass
class Return:
    has_value: bool
    lineno: int
    names: tuple[str, ...] | None = None  # ``return a`` / ``return a, b``: read directly
    tuple_: bool = False


@dataclass
class Jump:
    kind: str  # "break" or "continue"
    lineno: int


@dataclass
class Program:
    """A lowered function: its nodes and a factory that builds its segments."""

    nodes: list
    factory: Callable  # (unbound, locals, *closure values) -> list of segment functions
    fn: Callable
    filename: str
    locals: frozenset[str]
    n_segs: int = field(default=0)
    _cached: list[Callable] | None = field(default=None, repr=False)

    def segments(self, unbound: object) -> list[Callable]:
        """The segment functions, closing over the current values of ``fn``'s closure."""
        if not self.fn.__closure__:
            if self._cached is None:
                self._cached = self.factory(unbound, locals)
            return self._cached
        return self.factory(unbound, locals, *(c.cell_contents for c in self.fn.__closure__))


def _fail(where: tuple[str, int], what: str, fix: str) -> PerSampleError:
    filename, lineno = where
    return PerSampleError(f"@per_sample: {filename}, line {lineno}: {what}. {fix}",
                          filename=filename, lineno=lineno)


def lower(fn: Callable) -> Program:
    """Parse ``fn``'s source and lower it; raise ``PerSampleError`` for what is unsupported."""
    filename = inspect.getsourcefile(fn) or getattr(fn.__code__, "co_filename", "<unknown>")
    if fn.__name__ == "<lambda>":
        return _lower_lambda(fn, filename)
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError) as e:
        raise PerSampleError(
            f"@per_sample: cannot read the source of {fn.__qualname__!r} ({e}); it needs the "
            "source to rewrite the control flow. Define the function in a file or a notebook "
            "cell (the plain interactive interpreter keeps no source).",
            filename=filename, lineno=getattr(fn.__code__, "co_firstlineno", 0)) from None
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    ast.increment_lineno(tree, first - 1)
    fdef = tree.body[0]
    if isinstance(fdef, ast.AsyncFunctionDef) or not isinstance(fdef, ast.FunctionDef):
        raise _fail((filename, first), f"{fn.__qualname__!r} is not a plain function",
                    "Decorate a `def` function or a `forward` method.")
    _check(fdef, filename)
    params = [a.arg for a in (*fdef.args.posonlyargs, *fdef.args.args, *fdef.args.kwonlyargs)]
    params += [a.arg for a in (fdef.args.vararg, fdef.args.kwarg) if a is not None]
    lowering = _Lowering(filename, set(params) | _bound_names(fdef.body))
    nodes = lowering.block(fdef.body)
    return Program(nodes, lowering.compile(fn), fn, filename, frozenset(lowering.locals),
                   len(lowering.segs))


def _lower_lambda(fn: Callable, filename: str) -> Program:
    """A lambda is one expression: one segment that calls it (its source may be ambiguous)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY) for p in params):
        raise _fail((filename, fn.__code__.co_firstlineno), "a lambda with *args, **kwargs or "
                    "keyword-only parameters", "Write it as a `def`.")
    names = tuple(p.name for p in params)

    def factory(unbound: object, local_vars: Callable, *closure: Any) -> list[Callable]:
        return [lambda *values: {RESULT: fn(*values)}]

    seg = Seg(0, names, frozenset({*names, RESULT}), fn.__code__.co_firstlineno)
    return Program([seg, Return(True, seg.lineno, (RESULT,))], factory, fn, filename,
                   frozenset({*names, RESULT}), 1)


def _check(fdef: ast.FunctionDef, filename: str) -> None:
    """Refuse, with the line, what the runtime could not run per sample."""
    for node in _walk_scope(fdef.body):
        where = (filename, getattr(node, "lineno", fdef.lineno))
        if isinstance(node, ast.Yield | ast.YieldFrom | ast.Await):
            raise _fail(where, "generators and coroutines (yield/await) cannot run per sample",
                        "Return a tensor or a tuple of tensors instead.")
        if isinstance(node, ast.Global | ast.Nonlocal):
            raise _fail(where, f"`{type(node).__name__.lower()}` would let each sample write "
                        "one shared variable", "Return the value instead.")
        if isinstance(node, ast.Match):
            raise _fail(where, "`match` statements are not supported", "Use if/elif/else.")
        if isinstance(node, ast.While | ast.For | ast.AsyncFor) and node.orelse:
            raise _fail(where, f"`{'while' if isinstance(node, ast.While) else 'for'} ... "
                        "else` is not supported", "Set a flag before `break` and test it "
                        "after the loop.")
        if isinstance(node, ast.AsyncFor | ast.AsyncWith):
            raise _fail(where, "async statements cannot run per sample", "Use `for`/`with`.")
        if isinstance(node, ast.With | ast.Try | ast.TryStar) and any(
                isinstance(n, _CONTROL) for n in _walk_scope(node.body)):
            kind = "with" if isinstance(node, ast.With) else "try"
            raise _fail(where, f"if/while/for/return/break/continue inside `{kind}` cannot be "
                        "split per sample", f"Move the `{kind}` inside the branches, or around "
                        "the call of the decorated function.")
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store | ast.Del):
                        raise _fail(where, f"assignment to the attribute "
                                    f"`{ast.unparse(sub)}`: inside @per_sample each sample "
                                    "would write its own value into one shared object",
                                    "Return the value (e.g. `return out, extra`) and store "
                                    "it outside the decorated function.")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "super" and not node.args:
            raise _fail(where, "zero-argument `super()` needs the class cell, which the "
                        "rewritten segments do not have", "Write super(ClassName, self).")


def _walk_scope(stmts: list[ast.stmt]):
    """Every node of ``stmts`` that belongs to this function's scope (not nested defs)."""
    todo = list(stmts)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))


def _bound_names(stmts: list[ast.stmt]) -> set[str]:
    names = set()
    for node in _walk_scope(stmts):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


class _Lowering:
    def __init__(self, filename: str, local_names: set[str]) -> None:
        self.filename = filename
        self.locals = set(local_names)
        self.segs: list[ast.FunctionDef] = []
        self.count = 0

    def temp(self, kind: str) -> str:
        self.count += 1
        name = f"__an_{kind}{self.count}"
        self.locals.add(name)
        return name

    def block(self, stmts: list[ast.stmt]) -> list:
        out: list = []
        pending: list[ast.stmt] = []

        def flush() -> None:
            if pending:
                out.append(self.seg(pending))
                pending.clear()

        for s in stmts:
            if isinstance(s, ast.If):
                cond = self.temp("c")
                pending.append(_assign(cond, s.test, s))
                flush()
                out.append(If(cond, self.block(s.body), self.block(s.orelse), s.lineno))
            elif isinstance(s, ast.While):
                cond = self.temp("c")
                pending.append(_assign(cond, s.test, s))
                flush()
                body = self.block([*s.body, _assign(cond, s.test, s)])
                out.append(While(cond, body, self.seg([_assign(cond, s.test, s)]), s.lineno))
            elif isinstance(s, ast.For):
                items = self.temp("items")
                pending.append(_assign(items, s.iter, s))
                flush()
                self.locals.add(ITEM)
                target = s.target.id if isinstance(s.target, ast.Name) else self.seg(
                    [ast.copy_location(ast.Assign([s.target], ast.Name(ITEM, ast.Load())), s)])
                out.append(For(items, target, self.block(s.body), s.lineno))
            elif isinstance(s, ast.Return) and self.plain_names(s.value) is not None:
                flush()
                out.append(Return(True, s.lineno, self.plain_names(s.value),
                                  isinstance(s.value, ast.Tuple)))
            elif isinstance(s, ast.Return):
                if s.value is not None:
                    self.locals.add(RESULT)
                    pending.append(_assign(RESULT, s.value, s))
                flush()
                out.append(Return(s.value is not None, s.lineno))
            elif isinstance(s, ast.Break | ast.Continue):
                flush()
                out.append(Jump("break" if isinstance(s, ast.Break) else "continue", s.lineno))
            else:
                pending.append(s)
        flush()
        return out

    def plain_names(self, value: ast.expr | None) -> tuple[str, ...] | None:
        """``a`` or ``a, b`` of locals: returned without running a segment."""
        elts = value.elts if isinstance(value, ast.Tuple) else [value]
        if all(isinstance(e, ast.Name) and e.id in self.locals for e in elts):
            return tuple(e.id for e in elts)
        return None

    def seg(self, stmts: list[ast.stmt]) -> Seg:
        reads, writes = set(), set()
        for node in ast.walk(ast.Module(list(stmts), [])):
            if isinstance(node, ast.Name) and node.id in self.locals:
                (writes if isinstance(node.ctx, ast.Store) else reads).add(node.id)
            if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                reads.add(node.target.id)
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                writes.add(node.name)
            if isinstance(node, ast.alias):
                writes.add((node.asname or node.name).split(".")[0])
        inputs = tuple(sorted(reads))
        line = stmts[0]
        prologue = [ast.If(ast.Compare(ast.Name(n, ast.Load()), [ast.Is()],
                                       [ast.Name(_UNBOUND, ast.Load())]),
                           [ast.Delete([ast.Name(n, ast.Del())])], []) for n in inputs]
        ret = ast.Return(ast.Call(ast.Name(_LOCALS, ast.Load()), [], []))
        fdef = ast.FunctionDef(
            name=f"__an_seg{len(self.segs)}",
            args=ast.arguments([], [ast.arg(n) for n in inputs], None, [], [], None, []),
            body=[*(ast.copy_location(p, line) for p in prologue), *stmts,
                  ast.copy_location(ret, stmts[-1])],
            decorator_list=[], returns=None, type_params=[])
        ast.copy_location(fdef, line)
        self.segs.append(fdef)
        return Seg(len(self.segs) - 1, inputs, frozenset(reads | writes), line.lineno)

    def compile(self, fn: Callable) -> Callable:
        freevars = list(fn.__code__.co_freevars)
        names = [ast.Name(f.name, ast.Load()) for f in self.segs]
        factory = ast.FunctionDef(
            name="__an_factory",
            args=ast.arguments([], [ast.arg(n) for n in (_UNBOUND, _LOCALS, *freevars)], None,
                               [], [], None, []),
            body=[*self.segs, ast.Return(ast.List(names, ast.Load()))],
            decorator_list=[], returns=None, type_params=[])
        module = ast.fix_missing_locations(ast.Module([factory], []))
        namespace: dict[str, Any] = {}
        exec(compile(module, self.filename, "exec"), fn.__globals__, namespace)
        return namespace["__an_factory"]


def _assign(name: str, value: ast.expr, where: ast.AST) -> ast.Assign:
    return ast.copy_location(ast.Assign([ast.Name(name, ast.Store())], value), where)
