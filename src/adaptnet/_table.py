"""Tables for the terminal: as wide as the terminal, numbers whole, names wrapped.

The width is the terminal's (``COLUMNS`` when set, as rich and
``shutil.get_terminal_size`` read it; 80 when output is not a terminal). A
number column is at least as wide as its longest cell, so no number is ever
cut; text columns fold instead, down to 10 characters, or, where a column
holds names, wrap between words only (a module name is never cut). A table
that cannot fit even so is printed at its least width, wider than the
terminal, rather than cut.
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
          numbers: Collection[int] = (), words: Collection[int] = ()) -> Table:
    """A table whose columns ``numbers`` (indices) are right-aligned and never cut, and
    whose text columns ``words`` wrap only between words (names: never cut inside one)."""
    out = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD,
                show_edge=False, pad_edge=False)
    for i, name in enumerate(header):
        cells = [name, *(r[i] for r in rows)]
        if i in numbers:
            widest = max((len(r[i]) for r in rows), default=1)
            longest_word = max(map(len, name.split()), default=1)
            out.add_column(name, justify="right", width=max(widest, longest_word),
                           overflow="fold")
            continue
        if i in words:
            least = max((len(w) for text in cells for w in text.split()), default=1)
        else:
            least = min(max((len(r[i]) for r in rows), default=1), 10)
        natural = max(len(line) for text in cells for line in text.split("\n"))
        out.add_column(name, justify="left", overflow="fold", min_width=least,
                       max_width=max(natural, least))
    for r in rows:
        out.add_row(*r)
    return out


def show(console: Console, item: RenderableType) -> None:
    """Print ``item`` at the console's width, or at its least width if that is wider."""
    while hasattr(item, "__rich__"):
        item = item.__rich__()
    tables = [item] if isinstance(item, Table) else \
        [r for r in getattr(item, "renderables", ()) if isinstance(r, Table)]
    width = console.width
    fit = max([width, *(_least(t) for t in tables)])
    for t in tables:
        _fit(t, fit)
    console.width = fit  # rich cuts at the console's width: widen it for a wider table
    try:
        console.print(item)
    finally:
        console.width = width


def _least(t: Table) -> int:
    """The narrowest a table of :func:`table` can be drawn: numbers whole, text columns at
    their least (each column: its cells, padding 2, a separator; none at the edges)."""
    return sum((c.min_width if c.justify == "left" else c.width) + 3 for c in t.columns) - 3


def _fit(t: Table, width: int) -> None:
    """Set the text columns' widths so that the table fits ``width``: the widest text column
    narrows first, none below its least. (rich's own squeeze ignores a column's
    ``min_width``, then cuts the last column to make room.)"""
    text = [c for c in t.columns if c.justify == "left"]
    room = width - _least(t) + sum(c.min_width for c in text)
    widths = [c.max_width for c in text]
    while sum(widths) > room:
        over = [i for i, c in enumerate(text) if widths[i] > c.min_width]
        if not over:
            break
        widths[max(over, key=widths.__getitem__)] -= 1
    for c, w in zip(text, widths, strict=True):
        c.width = w


def render(item: RenderableType) -> str:
    """``item`` as plain text at the terminal's width (or its least width, if wider)."""
    buf = io.StringIO()
    show(Console(file=buf, width=shutil.get_terminal_size((80, 24)).columns,
                 color_system=None, force_terminal=False), item)
    return buf.getvalue().rstrip()
