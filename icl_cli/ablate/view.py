"""Terminal heatmaps for ``icl ablate`` (a rich Table whose cells are coloured by value).

Rows and columns with long labels are numbered; the row labels carry the names.
"""

from __future__ import annotations

from typing import Sequence


def _colour(v: float, centre: float, span: float) -> str:
    """Red above ``centre``, blue below, intensity by |v − centre| / span."""
    x = max(-1.0, min(1.0, (v - centre) / span)) if span > 0 else 0.0
    level = int(round(abs(x) * 4))
    if level == 0:
        return ""
    shades = ("grey30", "dark_red", "red3", "red1") if x > 0 else ("grey30", "navy_blue", "blue3", "blue1")
    return f"on {shades[level - 1]}"


def heatmap(title: str, rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float | None]],
            marks: Sequence[Sequence[bool]] | None = None, fmt: str = "{:+.2f}", centre: float = 0.0):
    """A rich Table: one row per ``rows`` label, one column per ``cols`` label; None cells are blank.

    Columns are headed by their index when labels are long; a mark adds ``*`` to the cell.
    """
    from rich.table import Table

    flat = [abs(v - centre) for row in values for v in row if v is not None]
    span = max(flat, default=0.0)
    numbered = any(len(c) > 6 for c in cols)
    tab = Table(title=title)
    tab.add_column("")
    for k, c in enumerate(cols):
        tab.add_column(str(k + 1) if numbered else c, justify="right")
    col_index = {c: k + 1 for k, c in enumerate(cols)}
    for i, r in enumerate(rows):
        label = f"{col_index[r]} {r}" if numbered and r in col_index else r
        cells = []
        for j, v in enumerate(values[i]):
            if v is None:
                cells.append("")
                continue
            star = "*" if marks is not None and marks[i][j] else ""
            cells.append(f"[{_colour(v, centre, span)}]{fmt.format(v)}{star}[/]" if _colour(v, centre, span) else fmt.format(v) + star)
        tab.add_row(label, *cells)
    if numbered and not all(r in col_index for r in rows):
        tab.caption = "columns: " + ", ".join(f"{k + 1} {c}" for k, c in enumerate(cols))
    return tab
