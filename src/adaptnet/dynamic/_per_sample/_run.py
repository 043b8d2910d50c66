"""The runtime: executes a lowered program on a batch, partitioning at each control point.

A *frame* is a set of samples that run the same statements: its rows (input
row numbers) and its live variables, whose tensors have one row per sample.
A segment runs once per frame, batched (``_batched.py``). At a per-sample
``if`` the frame splits into the samples whose test is true and the others;
each runs only its branch, and the samples that fall through are merged
again. A ``while`` keeps only the samples whose test is still true; a ``for``
drops the samples that ``break``. Rows are never put back in order until the
function returns, so a merge is a concatenation and the return is one gather.

Python values (modules, ints, strings) are the same for every sample of a
frame. When paths leave different Python numbers in a variable (a step
counter in a per-sample loop), the merge turns it into a per-sample tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from adaptnet.dynamic._per_sample._batched import run_segment
from adaptnet.dynamic._per_sample._lower import (
    ITEM,
    RESULT,
    For,
    If,
    Jump,
    Program,
    Return,
    Seg,
    While,
)
from adaptnet.errors import PerSampleError

__all__ = ["Frame", "execute"]

_NUMBER = (bool, int, float)


@dataclass
class Frame:
    rows: torch.Tensor | None  # input row of each sample; None: all rows, in order
    n: int
    env: dict[str, Any]
    undefined: dict[str, int] = field(default_factory=dict)  # name -> line that left it unset


class _Unbound:
    def __repr__(self) -> str:
        return "<unbound>"


UNBOUND = _Unbound()


def execute(program: Program, env: dict[str, Any], n: int, max_iters: int,
            fast: list[bool]) -> Any:
    """Run ``program`` on ``n`` samples whose arguments are in ``env``; return the outputs."""
    run = _Runner(program, max_iters, n == 0, fast)
    normal, exits = run.block(program.nodes, Frame(None, n, env))
    done = [f for kind, f in exits if kind == "return"]
    if normal is not None:
        normal.env[RESULT] = None  # falling off the end returns None
        done.append(normal)
    for f in done:  # only the result is still live
        f.env = {RESULT: f.env[RESULT]}
    final = run.merge(done, program.fn.__code__.co_firstlineno) if len(done) > 1 else done[0]
    result = final.env.get(RESULT)
    if final.rows is None:
        return result
    inverse = final.rows.argsort()  # rows is a permutation of 0..n-1
    return _map_tensors(result, lambda t: t.index_select(0, inverse))


class _Runner:
    def __init__(self, program: Program, max_iters: int, empty: bool, fast: list[bool]) -> None:
        self.program = program
        self.fns = program.segments(UNBOUND)
        self.max_iters = max_iters
        self.empty = empty  # a batch of 0 samples: run the else-paths so outputs have shapes
        self.fast = fast
        self.device = torch.device("cpu")  # of the frames being merged

    # -- statements --------------------------------------------------------------------

    def block(self, nodes: list, frame: Frame) -> tuple[Frame | None, list]:
        exits: list[tuple[str, Frame]] = []
        for node in nodes:
            if isinstance(node, Seg):
                self.seg(node, frame)
                continue
            if isinstance(node, Return):
                if node.names is not None:
                    values = tuple(self.read(frame, name, node.lineno) for name in node.names)
                    frame.env[RESULT] = values if node.tuple_ else values[0]
                elif not node.has_value:
                    frame.env[RESULT] = None
                return None, [*exits, ("return", frame)]
            if isinstance(node, Jump):
                return None, [*exits, (node.kind, frame)]
            frame, more = {If: self.if_, While: self.while_, For: self.for_}[type(node)](
                node, frame)
            exits += more
            if frame is None:
                return None, exits
        return frame, exits

    def read(self, frame: Frame, name: str, line: int) -> Any:
        if name in frame.env:
            return frame.env[name]
        if name in frame.undefined:
            raise self.unset(name, frame, line)
        raise UnboundLocalError(f"cannot access local variable '{name}' where it is not "
                                "associated with a value")

    def unset(self, name: str, frame: Frame, line: int) -> PerSampleError:
        return self.error(line, f"`{name}` is not set for some samples: only some paths "
                          f"through line {frame.undefined[name]} assign it",
                          "Give it a value before that statement, or on every path.")

    def seg(self, seg: Seg, frame: Frame) -> None:
        args = [frame.env.get(name, UNBOUND) for name in seg.inputs]
        try:
            out = run_segment(self.fns[seg.index], args, seg.writes, frame.n, frame.rows,
                              self.fast, seg.index, self.program.filename)
        except UnboundLocalError as e:
            name = next((n for n in seg.inputs if f"'{n}'" in str(e)), None)
            if name in frame.undefined:
                raise self.unset(name, frame, seg.lineno) from e
            raise
        env = frame.env
        for name in seg.writes:
            if name in out:
                env[name] = out[name]
                frame.undefined.pop(name, None)
            else:
                env.pop(name, None)

    def if_(self, node: If, frame: Frame) -> tuple[Frame | None, list]:
        cond = frame.env.pop(node.cond)
        take = self.split(cond, frame, node.lineno, "if")
        if take is None:  # a Python condition: the whole frame takes one path
            return self.block(node.body if cond else node.orelse, frame)
        yes, no = take
        if yes.shape[0] == frame.n and not self.empty:
            return self.block(node.body, frame)
        if no.shape[0] == frame.n:
            return self.block(node.orelse, frame)
        then_normal, then_exits = self.block(node.body, select(frame, yes))
        else_normal, else_exits = self.block(node.orelse, select(frame, no))
        normal = [f for f in (then_normal, else_normal) if f is not None]
        return self.merge(normal, node.lineno), then_exits + else_exits

    def while_(self, node: While, frame: Frame) -> tuple[Frame | None, list]:
        left: list[Frame] = []  # samples done with the loop
        exits: list = []
        running: Frame | None = frame
        steps = 0
        while running is not None:
            cond = running.env.pop(node.cond)
            take = self.split(cond, running, node.lineno, "while")
            if take is None:
                if not cond:
                    left.append(running)
                    break
            else:
                yes, no = take
                if no.shape[0] == running.n:
                    left.append(running)
                    break
                if no.shape[0]:
                    left.append(select(running, no))
                    running = select(running, yes)
            if steps == self.max_iters:
                raise self.error(node.lineno, f"the while loop ran {self.max_iters} "
                                 f"iterations and {running.n} sample(s) still satisfy its "
                                 "condition", "Raise the bound with @per_sample(max_iters=...) "
                                 "or make the condition fail.")
            steps += 1
            normal, body_exits = self.block(node.body, running)
            again = [] if normal is None else [normal]
            continued = [f for kind, f in body_exits if kind == "continue"]
            if continued:
                cont = self.merge(continued, node.lineno)
                self.seg(node.cond_seg, cont)
                again.append(cont)
            left += [f for kind, f in body_exits if kind == "break"]
            exits += [(kind, f) for kind, f in body_exits if kind == "return"]
            running = self.merge(again, node.lineno)
        return self.merge(left, node.lineno), exits

    def for_(self, node: For, frame: Frame) -> tuple[Frame | None, list]:
        items = frame.env.pop(node.items)
        if isinstance(items, torch.Tensor):
            if items.dim() < 2:
                raise self.error(node.lineno, "the for loop iterates over a per-sample 0-d "
                                 "tensor", "Iterate over a tensor with at least one dimension "
                                 "per sample, or over range(n).")
            items = list(items.unbind(1))
        elif not isinstance(items, range | list | tuple):
            items = list(items)
        frame.env[node.items] = items
        left: list[Frame] = []
        exits: list = []
        running: Frame | None = frame
        for k in range(len(items)):
            item = running.env[node.items][k]
            if isinstance(node.target, str):
                running.env[node.target] = item
            else:
                running.env[ITEM] = item
                self.seg(node.target, running)
                running.env.pop(ITEM, None)
            normal, body_exits = self.block(node.body, running)
            again = [] if normal is None else [normal]
            again += [f for kind, f in body_exits if kind == "continue"]
            left += [f for kind, f in body_exits if kind == "break"]
            exits += [(kind, f) for kind, f in body_exits if kind == "return"]
            running = self.merge(again, node.lineno)
            if running is None:
                break
        if running is not None:
            left.append(running)
        for f in left:
            f.env.pop(node.items, None)
        return self.merge(left, node.lineno), exits

    # -- partitions ----------------------------------------------------------------------

    def split(self, cond: Any, frame: Frame, line: int, kind: str
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows whose test is true and false, or None for a Python test."""
        if not isinstance(cond, torch.Tensor):
            return None
        if cond.dim() != 1:
            raise self.error(line, f"the `{kind}` test is a tensor of shape "
                             f"{tuple(cond.shape[1:])} per sample; Python would refuse it "
                             "('Boolean value of Tensor with more than one value is "
                             "ambiguous')", "Reduce it to one value per sample, e.g. "
                             "`.any()`, `.all()` or `.sum() > 0`.")
        true = cond if cond.dtype == torch.bool else cond != 0
        return true.nonzero().squeeze(1), (~true).nonzero().squeeze(1)

    def merge(self, frames: list[Frame], line: int) -> Frame | None:
        """Samples that reach the same statement from different paths: one frame again."""
        frames = [f for f in frames if f.n or self.empty]
        if not frames:
            return None
        if len(frames) == 1:
            return frames[0]
        rows = torch.cat([_rows(f) for f in frames])
        sizes = [f.n for f in frames]
        self.device = rows.device
        env: dict[str, Any] = {}
        undefined: dict[str, int] = {}
        for f in frames:
            undefined.update(f.undefined)
        names = set().union(*(f.env for f in frames))
        for name in names:
            if any(name not in f.env for f in frames):
                undefined[name] = line
                continue
            env[name] = self.merge_value("the return value" if name == RESULT else name,
                                         [f.env[name] for f in frames], sizes, line)
            undefined.pop(name, None)
        return Frame(rows, sum(sizes), env, undefined)

    def merge_value(self, name: str, values: list, sizes: list[int], line: int) -> Any:
        if not any(isinstance(v, list | tuple | dict) for v in values):
            return self.merge_leaf(name, values, sizes, line)
        flat = [pytree.tree_flatten(v) for v in values]
        spec = flat[0][1]
        if any(s != spec for _, s in flat):
            raise self.error(line, f"`{name}` has a different structure on different paths "
                             f"({', '.join(_describe(v) for v in values)})",
                             "Give it the same structure on every path (same list length, "
                             "same keys).")
        leaves = [self.merge_leaf(name, list(col), sizes, line)
                  for col in zip(*(lv for lv, _ in flat), strict=True)]
        return pytree.tree_unflatten(leaves, spec)

    def merge_leaf(self, name: str, values: list, sizes: list[int], line: int) -> Any:
        first = values[0]
        if all(isinstance(v, torch.Tensor) for v in values):
            for v in values[1:]:
                if v.shape[1:] != first.shape[1:] or v.dtype != first.dtype:
                    raise self.error(line, f"`{name}` is {_describe(first)} on one path and "
                                     f"{_describe(v)} on another", "Per-sample values must "
                                     "agree in shape and dtype on every path to be batched; "
                                     "pad, reduce or cast them before the paths meet.")
            return torch.cat(values)
        if not any(isinstance(v, torch.Tensor) for v in values):
            try:
                same = all(v is first or bool(v == first) for v in values)
            except Exception:  # an object without a usable ==
                same = False
            if same:
                return first
        if all(isinstance(v, _NUMBER) or (isinstance(v, torch.Tensor) and v.dim() == 1)
               for v in values):
            like = next((v for v in values if isinstance(v, torch.Tensor)), None)
            dtype = like.dtype if like is not None else torch.tensor(values).dtype
            device = like.device if like is not None else self.device
            return torch.cat([v if isinstance(v, torch.Tensor) else
                              torch.full((k,), v, dtype=dtype, device=device)
                              for v, k in zip(values, sizes, strict=True)])
        raise self.error(line, f"`{name}` differs between paths "
                         f"({', '.join(_describe(v) for v in values)}) and cannot be made "
                         "one per-sample tensor", "Use the same Python value on every path, "
                         "or a tensor.")

    def error(self, line: int, what: str, fix: str) -> PerSampleError:
        return PerSampleError(f"@per_sample: {self.program.filename}, line {line}: {what}. "
                              f"{fix}", filename=self.program.filename, lineno=line)


def select(frame: Frame, idx: torch.Tensor) -> Frame:
    """The samples ``idx`` (positions in ``frame``) as a frame of their own."""
    rows = idx if frame.rows is None else frame.rows.index_select(0, idx)
    env = {k: _map_tensors(v, lambda t: t.index_select(0, idx)) for k, v in frame.env.items()}
    return Frame(rows, idx.shape[0], env, dict(frame.undefined))


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list | tuple | dict):
        return pytree.tree_map_only(torch.Tensor, fn, value)
    return value


def _rows(frame: Frame) -> torch.Tensor:
    if frame.rows is not None:
        return frame.rows
    device = next((v.device for v in frame.env.values() if isinstance(v, torch.Tensor)), None)
    return torch.arange(frame.n, device=device)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape[1:])} {str(value.dtype).removeprefix('torch.')} tensor"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    return repr(value) if isinstance(value, (*_NUMBER, str, type(None))) else \
        type(value).__name__
