"""Matplotlib helpers shared by the renderers: one style, PNG + SVG output, legible heatmaps.

Every figure is drawn off-screen (Agg), saved as ``<stem>.png`` (150 dpi) and ``<stem>.svg``
under the report folder, and closed. index.html shows a PNG at two thirds of its pixels (one
inch of figure = 100 CSS px), so a figure up to ``MAX_WIDTH_IN`` wide is shown at its drawn size
and a 9 pt label reads as 12.5 px. Figure sizes grow with the number of rows and columns up to
that width, so task names and cell labels never overlap.

Colour scales follow the data: a sequential map spans the data's range (``heatmap`` without
limits), a signed quantity gets a diverging map centred on 0 (``center=0``). Cell labels keep two
significant digits, so a coloured cell never reads "0.00" (``cell_text``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

_READY = False


STYLE_VERSION = 2
"""Bump when a change here changes figures, so cached figure files are redrawn (report.py)."""
MAX_WIDTH_IN = 11.8
"""Widest figure shown unscaled in index.html (1,180 CSS px at 100 px per inch)."""


def plt():
    """pyplot with the Agg backend and the report's style (imported on first use: it is slow)."""
    global _READY
    import matplotlib

    if not _READY:
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as p

        p.rcParams.update({
            "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
            "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False,
            "figure.dpi": 100, "savefig.dpi": 150, "svg.fonttype": "path", "axes.grid": True, "grid.alpha": 0.25,
            "svg.hashsalt": "icl",  # stable ids, so an unchanged figure is byte-identical
        })
        _READY = True
    import matplotlib.pyplot as p

    return p


def task_label(name: str) -> str:
    """A readable task name: en_es -> 'en → es', location_continent -> 'location continent'."""
    m = re.fullmatch(r"([a-z]{2})_([a-z]{2})", name)
    if m:
        return f"{m.group(1)} → {m.group(2)}"
    return name.replace("_", " ")


def save(fig, out: Path, stem: str) -> list[Path]:
    """Write ``stem``.png and ``stem``.svg under ``out`` and close the figure; returns both paths."""
    p = plt()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None})
    p.close(fig)
    return paths


def cell_text(v: float, signed: bool = False) -> str:
    """A cell label with two significant digits: 0.5 -> '0.50', 0.0123 -> '0.012', 3e-5 -> '3.0e-05';
    exactly 0 -> '0'. Never '0.00' for a value that is not 0."""
    if v == 0:
        return "0"
    a = abs(v)
    sign = "+" if signed and v > 0 else ""
    if a >= 1e4 or a < 1e-3:
        return f"{sign}{v:.1e}"
    e = int(np.floor(np.log10(a)))
    digits = max(0, 2 - e) if a >= 1 else max(2, 1 - e)  # 1.23, 12.3, 123; 0.50, 0.050, 0.0050
    return f"{sign}{v:.{digits}f}"


def data_limits(data: np.ndarray, center: float | None = None) -> tuple[float, float]:
    """(vmin, vmax) of a colour scale that fits ``data``: its range, or symmetric around ``center``."""
    finite = np.asarray(data, dtype=float)
    finite = finite[np.isfinite(finite)]
    if center is not None:
        span = float(np.abs(finite - center).max()) if finite.size else 1.0
        span = span or 1.0
        return center - span, center + span
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    return lo, hi


def heatmap(ax, data: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None, cbar: str = "", annotate: bool | None = None,
            fmt: str | None = None, center: float | None = None, xrotation: int | None = None):
    """Draw ``data`` [R, C] on ``ax`` with labelled rows/columns and a colour bar titled ``cbar``.

    Limits: ``vmin``/``vmax`` when given, else the data's range (sequential), or with ``center`` a
    diverging map symmetric around it. ``fmt``: a format for cell labels (default: ``cell_text``,
    signed with ``center``). ``xrotation``: of the column labels (default 45° when they are longer
    than 3 characters). Cells are annotated when the matrix is small enough for the numbers to fit
    (≤ 16 columns and ≤ 30 rows by default).
    """
    p = plt()
    data = np.asarray(data, dtype=float)
    if center is not None:
        vmin, vmax = data_limits(data, center)
    elif vmin is None or vmax is None:
        lo, hi = data_limits(data)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    if xrotation is None:
        xrotation = 45 if max((len(c) for c in cols), default=0) > 3 else 0
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=xrotation, rotation_mode="anchor",
                  ha="right" if xrotation else "center", va="center" if xrotation == 90 else "top")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)
    bar = ax.figure.colorbar(im, ax=ax, fraction=0.046 if data.shape[1] > 4 else 0.1, pad=0.02)
    bar.set_label(cbar)
    if annotate is None:
        annotate = data.shape[1] <= 16 and data.shape[0] <= 30
    if annotate:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                if not np.isfinite(v):
                    continue
                r, g, b, _ = im.cmap(im.norm(v))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # readable on the cell
                text = fmt.format(v) if fmt else cell_text(float(v), signed=center is not None)
                ax.text(j, i, text, ha="center", va="center", fontsize=7.5, color=ink)
    return im, p


def heatmap_size(n_rows: int, n_cols: int, row_label: int = 14, col_label: int = 10) -> tuple[float, float]:
    """(width, height) in inches for a heatmap: 0.45 in per column (less when that would pass
    ``MAX_WIDTH_IN``), 0.28 in per row, plus label room."""
    room = 1.6 + 0.075 * row_label + 1.2
    w = room + min(0.45 * n_cols, MAX_WIDTH_IN - room)
    h = 1.2 + 0.07 * col_label + 0.28 * n_rows
    return max(w, 6.0), max(h, 3.4)


def tick_size(n: int, span_in: float, largest: float = 9.0, smallest: float = 6.5) -> float:
    """Font size (pt) of ``n`` tick labels sharing ``span_in`` inches: as large as fits, 6.5-9 pt."""
    return float(np.clip(0.8 * 72 * span_in / max(n, 1), smallest, largest))


def group_order(tasks: Sequence[str]) -> list[int]:
    """Indices of ``tasks`` sorted by the paper's task groups (core/tasks.py GROUPS), stable inside a
    group; tasks outside the built-in groups come last."""
    from icl_cli.core.tasks import GROUPS

    rank = {g: k for k, g in enumerate(GROUPS)}
    return sorted(range(len(tasks)), key=lambda i: rank.get(task_group(tasks[i]), len(rank)))


def task_group(name: str) -> str | None:
    from icl_cli.core.tasks import GROUP_OF

    return GROUP_OF.get(name)


def group_separators(ax, tasks: Sequence[str], axis: str = "y", color: str = "white", lw: float = 2.0) -> list[int]:
    """Lines between consecutive tasks of different groups along ``axis`` of a heatmap; returns the
    boundaries drawn (a line is drawn after index i - 1, at i - 0.5)."""
    cuts = [i for i in range(1, len(tasks)) if task_group(tasks[i]) != task_group(tasks[i - 1])]
    for i in cuts:
        (ax.axhline if axis == "y" else ax.axvline)(i - 0.5, color=color, lw=lw)
    return cuts


def outline_legend(ax, color: str, label: str, n: int, none_text: str) -> None:
    """A legend entry for the cells outlined in ``color`` (``n`` of them), or ``none_text`` when none is."""
    from matplotlib.patches import Patch

    text = f"outlined: {label}" if n else f"outlined: none ({none_text})"
    ax.legend(handles=[Patch(facecolor="none", edgecolor=color, lw=1.8, label=text)], loc="lower left",
              bbox_to_anchor=(0.0, 1.0), frameon=False, fontsize=8, borderaxespad=0.2)


def outline_pairs(ax, own, color: str) -> None:
    """Outline the cells where ``own`` ([rows, cols] bool) holds, pairs of the same task, with their
    legend; when most cells would be outlined none is (it would show nothing) and the legend says so."""
    import numpy as np

    n = 0
    if own.mean() < 0.5:
        for i, j in zip(*np.nonzero(own)):
            outline(ax, i, j, color)
            n += 1
    outline_legend(ax, color, "pairs of the same task", n,
                   "most shown pairs share a task" if own.any() else "no shown pair shares a task")


def outline(ax, i: int, j: int, color: str = "tab:cyan", lw: float = 1.8) -> None:
    """Outline cell (row i, column j) of a heatmap, inset so neighbouring outlines stay apart."""
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((j - 0.44, i - 0.44), 0.88, 0.88, fill=False, edgecolor=color, lw=lw))


def plain_log_axis(ax, axis: str = "x") -> None:
    """Log scale with ticks written as plain numbers (1, 2, 5, 10, 20, …; 1k, 10k above 1,000);
    call it after plotting: over more than two decades only the powers of ten are labelled, so
    neighbouring labels never run into each other ("500010000")."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    decades = np.log10(max(hi, 1e-12) / max(lo, 1e-12))
    subs = (1.0, 2.0, 5.0) if decades <= 2.2 else (1.0,)
    a.set_major_locator(LogLocator(base=10, subs=subs))
    a.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    a.set_major_formatter(FuncFormatter(lambda v, _: plain_number(v)))
    a.set_minor_formatter(NullFormatter())


def plain_number(v: float) -> str:
    """1 -> '1', 0.5 -> '0.5', 2000 -> '2k', 10000 -> '10k', 2.5e6 -> '2.5M'."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"
