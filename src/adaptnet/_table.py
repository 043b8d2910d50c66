"""Tables for the terminal: as wide as the terminal, numbers whole, names wrapped.

The width is the terminal's (``COLUMNS`` when set, as rich and
``shutil.get_terminal_size`` read it; 80 when output is not a terminal). A
number column is at least as wide as its longest cell, so no number is ever
cut; text columns fold instead, down to 10 characters. A table that cannot fit
even so is printed at its least width, wider than the terminal, rather than
cut.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Collection, Sequence

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

__all__ = ["render", "show", "table"]


def table(title: str | None, header: Sequence[str], rows: Sequence[Sequence[str]],
          numbers: Collection[int] = ()) -> Table:
    """A table whose columns ``numbers`` (indices) are right-aligned and never cut."""
    out = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD,
                show_edge=False, pad_edge=False)
    for i, name in enumerate(header):
        if i in numbers:
            widest = max((len(r[i]) for r in rows), default=1)
            longest_word = max(map(len, name.split()), default=1)
            out.add_column(name, justify="right", width=max(widest, longest_word),
                           overflow="fold")
        else:
            longest = max((len(r[i]) for r in rows), default=1)
            out.add_column(name, justify="left", overflow="fold", min_width=min(longest, 10))
    for r in rows:
        out.add_row(*r)
    return out


def show(console: Console, item: RenderableType) -> None:
    """Print ``item`` at the console's width, or at its least width if that is wider."""
    width = console.width
    least = _least(item)
    if least <= width:
        console.print(item)
        return
    console.width = least  # rich cuts at the console's width: widen it for this table
    try:
        console.print(item)
    finally:
        console.width = width


def _least(item: RenderableType) -> int:
    """The narrowest a table of :func:`table` (or a Group holding one) can be drawn."""
    while hasattr(item, "__rich__"):
        item = item.__rich__()
    tables = [item] if isinstance(item, Table) else \
        [r for r in getattr(item, "renderables", ()) if isinstance(r, Table)]
    return max((sum((c.width or c.min_width or 1) + 3 for c in t.columns) - 3 for t in tables),
               default=0)  # each column: its cells, padding 2, a separator; none at the edges


def render(item: RenderableType) -> str:
    """``item`` as plain text at the terminal's width (or its least width, if wider)."""
    buf = io.StringIO()
    show(Console(file=buf, width=shutil.get_terminal_size((80, 24)).columns,
                 color_system=None, force_terminal=False), item)
    return buf.getvalue().rstrip()
