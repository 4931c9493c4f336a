"""What a renderer produces for one artifact, and the registry of renderers by step name.

A renderer turns one store artifact into a :class:`Section`: plain tables (shown in the terminal
with rich and in ``index.html``), extra terminal renderables (heatmaps, contexts), figures (PNG +
SVG written under the report folder) and a JSON summary (``icl --json report``). Renderers
never print; the command layer does.

    @register("collect")
    class CollectRenderer(Renderer): ...
    section = renderer_for(art.step).section(art, out_dir=Path("report"))
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from icl_cli.core.errors import IclError


@dataclass
class Table:
    """A plain table: strings only, so it renders the same in rich and in HTML."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    align: str = ""
    """One character per column, l or r (default: first column left, the rest right)."""
    terminal: bool = True
    """Shown in the terminal too (False: the renderer gives the terminal a more compact view)."""

    def _aligns(self) -> str:
        return self.align or ("l" + "r" * (len(self.columns) - 1))

    def to_rich(self, max_rows: int | None = None):
        """A rich table; with ``max_rows`` the first rows and a caption saying how many are left out."""
        from rich.table import Table as RichTable
        from rich.text import Text

        rows = self.rows if max_rows is None else self.rows[:max_rows]
        cap = self.caption
        if len(rows) < len(self.rows):
            cap = (cap + " " if cap else "") + f"(first {len(rows)} of {len(self.rows):,} rows; --json or the report's CSV has all)"
        tab = RichTable(title=Text(self.title), caption=Text(cap) if cap else None, caption_justify="left")
        for col, a in zip(self.columns, self._aligns()):
            tab.add_column(Text(col), justify="left" if a == "l" else "right")
        for row in rows:
            tab.add_row(*(Text(c) for c in row))
        return tab

    def to_html(self, max_rows: int | None = None, csv_href: str | None = None) -> str:
        """The table as HTML; with ``max_rows`` only the first rows, and a link to ``csv_href`` (the
        file :meth:`write_csv` wrote) for all of them."""
        esc = html.escape
        aligns = self._aligns()
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        head = "".join(f"<th class='{a}'>{esc(c)}</th>" for c, a in zip(self.columns, aligns))
        body = "".join("<tr>" + "".join(f"<td class='{a}'>{esc(v)}</td>" for v, a in zip(r, aligns)) + "</tr>"
                       for r in rows)
        cap = f"<p class='caption'>{esc(self.caption)}</p>" if self.caption else ""
        if len(rows) < len(self.rows):
            link = f": <a href='{esc(csv_href)}'>all {len(self.rows):,} rows as CSV</a>" if csv_href else ""
            cap += f"<p class='caption'>First {len(rows)} of {len(self.rows):,} rows{link}.</p>"
        return (f"<h4>{esc(self.title)}</h4><div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
                f"</table></div>{cap}")

    def write_csv(self, path: Path) -> Path:
        """Every row of the table as CSV (a header row of the column names first)."""
        import csv

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            w.writerows(self.rows)
        return path


@dataclass
class Figure:
    """One figure of the report: the files written (PNG and SVG) and what it shows."""

    title: str
    caption: str
    files: list[Path]
    """Absolute paths; the first one is the image shown in index.html."""


@dataclass
class Contexts:
    """Max-activating contexts of a feature: rows of (activation, tokens, index of the firing token)."""

    title: str
    rows: list[tuple[float, list[str], int]]
    feature: int | None = None
    """The feature whose contexts these are (None: not known)."""
    sae: str | None = None
    """Key of the SAE the feature belongs to: (sae, feature) names the contexts, so a report shows them once."""


@dataclass
class Section:
    """Everything the report shows for one artifact."""

    key: str
    step: str
    title: str
    summary: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    contexts: list[Contexts] = field(default_factory=list)
    terminal: list[Any] = field(default_factory=list)
    """Extra rich renderables shown only in the terminal (heatmaps), before the tables."""
    notes: list[str] = field(default_factory=list)
    label: str = ""
    """A short name for the report's navigation (kind, layer, tasks); default: the step."""


class Renderer:
    """Base class: subclasses set ``step`` and implement :meth:`build`."""

    step: str = ""
    version: int = 1
    """Bump when the figures change, so cached figure files are redrawn."""

    def build(self, art, out: Path | None) -> Section:  # pragma: no cover - abstract
        raise NotImplementedError

    def section(self, art, out: Path | None = None) -> Section:
        """The section of ``art``; figures are drawn only when ``out`` is a folder."""
        try:
            return self.build(art, out)
        except (KeyError, OSError, ValueError, IndexError) as exc:
            raise IclError(f"cannot render {art.step} artifact {art.key[:12]}: {type(exc).__name__}: {exc}; "
                           f"run `icl store verify {art.key[:12]}`") from exc


_REGISTRY: dict[str, Renderer] = {}


def register(step: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.step = step
        _REGISTRY[step] = cls()
        return cls

    return deco


def renderer_for(step: str) -> Renderer | None:
    """The renderer of a step, or None when the step has none (the generic section is used)."""
    from icl_cli.report import renderers  # noqa: F401 - fills the registry

    return _REGISTRY.get(step)


def known_steps() -> list[str]:
    from icl_cli.report import renderers  # noqa: F401

    return sorted(_REGISTRY)


def fmt(v: float | None, digits: int = 3) -> str:
    """A number for a table cell ('–' for missing / NaN)."""
    if v is None or v != v:
        return "–"
    return f"{v:.{digits}f}"


def pct(v: float | None) -> str:
    return "–" if v is None or v != v else f"{v:.1f}%"


def short_list(items: Sequence, n: int = 8) -> str:
    text = ", ".join(str(x) for x in list(items)[:n])
    return text + (f", … ({len(items)} in all)" if len(items) > n else "")
