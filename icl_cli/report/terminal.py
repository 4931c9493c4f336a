"""Terminal renderings that have no HTML twin: heatmaps as shaded rich tables, lineage trees."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from icl_cli.report.base import Contexts

# a 9-step sequential ramp (dark to bright), readable on dark and light terminals
_RAMP = ["#1b1b3a", "#2c2f6b", "#33518f", "#2f7aa3", "#2aa3a0", "#4cc38a", "#9bd86a", "#e0e35a", "#fff27a"]


def heatmap(title: str, data: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, lo: float | None = None,
            hi: float | None = None, digits: int = 2, caption: str = ""):
    """A rich table whose cells are shaded by value (bright = high), numbers printed inside."""
    from rich.table import Table
    from rich.text import Text

    data = np.asarray(data, dtype=float)
    finite = data[np.isfinite(data)]
    lo = float(finite.min()) if lo is None and finite.size else (lo or 0.0)
    hi = float(finite.max()) if hi is None and finite.size else (hi if hi is not None else 1.0)
    tab = Table(title=Text(title), caption=Text((caption + " " if caption else "") + f"(shade: {lo:.{digits}f} dark … {hi:.{digits}f} bright)"),
                caption_justify="left", show_lines=False, pad_edge=False)
    tab.add_column("")
    for c in cols:
        tab.add_column(str(c), justify="right")
    for name, row in zip(rows, data):
        cells = []
        for v in row:
            if not np.isfinite(v):
                cells.append(Text("–"))
                continue
            k = 0 if hi <= lo else int(round((min(max(v, lo), hi) - lo) / (hi - lo) * (len(_RAMP) - 1)))
            ink = "black" if k >= 5 else "white"
            cells.append(Text(f"{v:.{digits}f}", style=f"{ink} on {_RAMP[k]}"))
        tab.add_row(str(name), *cells)
    return tab


def compact_heatmap(title: str, data: np.ndarray, rows: Sequence[str], cols: Sequence[int | str], *,
                    lo: float | None = None, hi: float | None = None, marks: Sequence[int | None] = (),
                    extra: dict[str, Sequence[str]] | None = None, caption: str = ""):
    """A heatmap two characters per column, for more columns than a table of numbers can show:
    each cell a shaded block (bright = high), ``marks[i]`` the column starred in row i, column
    headers every 5th column. ``extra``: columns of text appended after the blocks."""
    from rich.table import Table
    from rich.text import Text

    data = np.asarray(data, dtype=float)
    finite = data[np.isfinite(data)]
    lo = float(finite.min()) if lo is None and finite.size else (lo if lo is not None else 0.0)
    hi = float(finite.max()) if hi is None and finite.size else (hi if hi is not None else 1.0)
    head = Text()
    for k, c in enumerate(cols):
        head.append(f"{str(c):<2}"[:2] if k % 5 == 0 else "  ")
    from rich import box

    tab = Table(title=Text(title), caption=Text((caption + " " if caption else "") + f"shade: {lo:.2f} dark to {hi:.2f} bright; ** best"),
                caption_justify="left", pad_edge=False, box=box.SIMPLE_HEAD)
    tab.add_column("")
    tab.add_column(head, no_wrap=True)
    for name in (extra or {}):
        tab.add_column(name, justify="right")
    for i, (name, row) in enumerate(zip(rows, data)):
        cells = Text()
        for j, v in enumerate(row):
            if not np.isfinite(v):
                cells.append("  ")
                continue
            k = 0 if hi <= lo else int(round((min(max(v, lo), hi) - lo) / (hi - lo) * (len(_RAMP) - 1)))
            star = i < len(marks) and marks[i] == j
            cells.append("**" if star else "  ", style=f"{'black' if k >= 5 else 'white'} on {_RAMP[k]}")
        tab.add_row(str(name), cells, *(str(col[i]) for col in (extra or {}).values()))
    return tab


class Fit:
    """Shows ``wide`` when it fits the console's width, else ``narrow`` (decided when printed)."""

    def __init__(self, wide, narrow):
        self.wide, self.narrow = wide, narrow

    def __rich_console__(self, console, options):
        from rich.measure import Measurement

        need = Measurement.get(console, options.update(max_width=100_000), self.wide).maximum  # unclamped
        yield self.wide if need <= options.max_width else self.narrow


def lineage_tree(node: dict[str, Any], label=None):
    """A rich Tree of ``Store.lineage`` output: step, short key and names of every ancestor."""
    from rich.tree import Tree

    def text(n: dict[str, Any], via: str | None) -> str:
        names = f" ({', '.join(n.get('names') or [])})" if n.get("names") else ""
        step = n.get("step") or "missing"
        return f"{via + ': ' if via else ''}{step} {n['key'][:12]}{names}"

    tree = Tree(label or text(node, None))

    def add(parent, n):
        for via, child in n.get("inputs", {}).items():
            add(parent.add(text(child, via)), child)

    add(tree, node)
    return tree


def contexts_table(c: Contexts):
    """Max-activating contexts with the firing token highlighted."""
    from rich.table import Table
    from rich.text import Text

    tab = Table(title=c.title, title_justify="left")
    tab.add_column("act", justify="right")
    tab.add_column("context (firing token highlighted)")
    for value, tokens, fire in c.rows:
        text = Text()
        for i, tok in enumerate(tokens):
            text.append(tok + " ", style="bold black on yellow" if i == fire else "")
        tab.add_row(f"{value:.2f}", text)
    return tab
