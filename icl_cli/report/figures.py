"""Matplotlib helpers shared by the renderers: one style, PNG + SVG output, legible heatmaps.

Every figure is drawn off-screen (Agg), saved as ``<stem>.png`` (150 dpi) and ``<stem>.svg``
under the report folder, and closed. Figure sizes grow with the number of rows and columns, so
task names and cell labels never overlap at the default size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

_READY = False


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


def heatmap(ax, data: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None, cbar: str = "", annotate: bool | None = None,
            fmt: str = "{:.2f}", center: float | None = None, xrotation: int | None = None):
    """Draw ``data`` [R, C] on ``ax`` with labelled rows/columns and a colour bar titled ``cbar``.

    ``center``: use a diverging map symmetric around this value; ``xrotation``: of the column labels
    (default 45° when they are longer than 3 characters). Cells are annotated when the
    matrix is small enough for the numbers to fit (≤ 16 columns and ≤ 30 rows by default).
    """
    p = plt()
    data = np.asarray(data, dtype=float)
    if center is not None:
        span = np.nanmax(np.abs(data - center)) if np.isfinite(data).any() else 1.0
        span = span or 1.0
        vmin, vmax = center - span, center + span
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
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7.5, color=ink)
    return im, p


def heatmap_size(n_rows: int, n_cols: int, row_label: int = 14, col_label: int = 10) -> tuple[float, float]:
    """(width, height) in inches for a heatmap: 0.45 in per column, 0.28 in per row, plus label room."""
    w = 1.6 + 0.075 * row_label + 0.45 * n_cols + 1.2
    h = 1.2 + 0.07 * col_label + 0.28 * n_rows
    return max(w, 6.0), max(h, 3.4)


def outline(ax, i: int, j: int, color: str = "tab:cyan", lw: float = 1.8) -> None:
    """Outline cell (row i, column j) of a heatmap, inset so neighbouring outlines stay apart."""
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((j - 0.44, i - 0.44), 0.88, 0.88, fill=False, edgecolor=color, lw=lw))


def plain_log_axis(ax, axis: str = "x") -> None:
    """Log scale with ticks written as plain numbers (1, 2, 5, 10, 20, …) instead of 2×10⁰."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())
