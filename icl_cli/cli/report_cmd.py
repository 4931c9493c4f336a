"""``icl report``: render artifacts in the terminal; with ``--out`` also the figures and index.html.

    icl report pipeline-clean                       # tables, heatmaps, contexts, lineage
    icl report pipeline-clean --inputs --out report # + every ancestor, figures, report/index.html
    icl -q report KEY1 KEY2 --out report            # -q: the paths written, index.html first
    INDEX=$(icl -q report KEY1 --out report | head -n 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from icl_cli.cli.context import Globals, emit, g, log


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)


def report_cmd(
    ctx: typer.Context,
    refs: List[str] = typer.Argument(..., help="Artifacts to report (keys, prefixes of ≥ 6 characters or names)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures (PNG + SVG under DIR/figures), the CSVs of long tables and DIR/index.html; -q prints their paths, index.html first."),
    inputs: bool = typer.Option(False, "--inputs", help="Also report every artifact these were made from."),
    params: bool = typer.Option(False, "--params", help="Show each artifact's parameters in the terminal too."),
    brief: bool = typer.Option(False, "--brief", help="Print only the headline findings, the dictionaries' quality, where things are and what to run next."),
) -> None:
    """Render artifacts: tables, heatmaps, top features' contexts, lineage; figures and index.html with --out."""
    from icl_cli.report import build_report

    gl = g(ctx)
    rep = build_report(gl.store(), refs, out=out.resolve() if out else None, with_inputs=inputs,
                       progress=lambda m: log(f"rendering {m}", ctx_globals=gl))
    show_report(gl, rep, brief=brief, params=params)


def show_report(gl: Globals, rep, brief: bool = False, params: bool = False) -> None:
    """Print a built report (report/report.py:build_report): where its index.html is on stderr,
    then the terminal view (or only the headline and pointers with ``brief``), or its JSON."""
    from icl_cli.report import report_json

    if rep.index is not None:
        log(f"report written: {rep.index}", ctx_globals=gl, style=None)
    elif gl.quiet:
        log("nothing written: -q prints the paths --out writes", ctx_globals=gl)
    view = (lambda: _brief(rep, gl.store())) if brief else (lambda: _terminal(rep, params))
    emit(gl, report_json(rep), table=view, keys=[str(p) for p in rep.written])


_VERDICT_STYLE = {"yes": "green", "partly": "yellow", "no": "red", "cannot detect": "cyan", "no paper figure": "dim"}
TERMINAL_ROWS = 50
"""At most this many rows of a table in the terminal (--json and the report's CSVs have all)."""


def _headline_table(rep):
    from rich.table import Table
    from rich.text import Text

    from icl_cli.report.headline import verdict_word

    title = "headline findings beside the paper's" + (f"\nthis run: {rep.setup}" if rep.setup else "")
    tab = Table(title=Text(title), title_justify="left", show_lines=True)
    tab.add_column("finding", ratio=3)
    tab.add_column("this run", ratio=4)
    tab.add_column("matches the paper?", ratio=3)
    tab.add_column("paper (Gemma-1 2B)", ratio=3)
    for r in rep.headline:
        match = r.get("match", "")
        tab.add_row(Text(r["finding"]), Text(r["ours"]), Text(match, style=_VERDICT_STYLE.get(verdict_word(match), "")),
                    Text(r["paper"]))
    return tab


def _brief(rep, store) -> list:
    """The end of a pipeline run: findings, dictionary quality, where things are, next commands."""
    from rich.table import Table
    from rich.text import Text

    out = [_headline_table(rep)] if rep.headline else []
    saes = [s for s in rep.sections if "ce_recovered" in s.summary or "fvu" in s.summary]
    if saes:
        tab = Table(title="dictionaries used (held-out tokens)", title_justify="left")
        for col in ("dictionary", "L0", "FVU", "CE recovered", "key"):
            tab.add_column(col, justify="left" if col in ("dictionary", "key") else "right")
        for s in saes:
            q = s.summary
            f = lambda k, d: "–" if q.get(k) is None else f"{q[k]:.{d}f}"  # noqa: E731
            tab.add_row(Text(s.title), f("l0", 1), f("fvu", 3), f("ce_recovered", 3), s.key[:12])
        out.append(tab)
    out.append(Text(f"artifacts: {len(store.keys())} in the store {store.root.resolve()}, {len(rep.sections)} of them "
                    "reported (`icl store ls`, `icl store show KEY`)"))
    if rep.index is not None:
        out.append(Text(f"report: {rep.index}", style="bold"))
    out.append(Text("next:\n" + "\n".join("  " + n for n in next_hints(rep))))
    return out


def next_hints(rep) -> list[str]:
    """Commands worth running next, each naming the artifact it shows."""
    first = {}
    for s in rep.sections:
        p = rep.params.get(s.key) or {}
        kind = s.step + ":" + str(p.get("mode") or p.get("kind") or "")
        first.setdefault(kind, s.key[:12])
        first.setdefault(s.step, s.key[:12])
    nxt = ["icl report KEY                one artifact in the terminal: tables, heatmaps, contexts, lineage"]
    if "steer:executor" in first:
        nxt.append(f"icl report {first['steer:executor']}   the executor heatmap in the terminal")
    if "ablate:link" in first:
        nxt.append(f"icl report {first['ablate:link']}   the detector → executor link")
    if "circuit" in first:
        nxt.append(f"icl report {first['circuit']}   a circuit's nodes and edges")
    return nxt


def _terminal(rep, show_params: bool) -> list:
    from rich.rule import Rule
    from rich.text import Text

    from icl_cli.report.terminal import contexts_table, lineage_tree

    out = []
    for sec in rep.sections:
        out.append(Rule(Text(f"{sec.title}  ({sec.step} {sec.key[:12]})"), align="left"))
        out += [Text(n) for n in sec.notes]
        out += sec.terminal
        out += [t.to_rich(TERMINAL_ROWS) for t in sec.tables if t.terminal and (show_params or t.title != "parameters")]
        out += [contexts_table(c) for c in sec.contexts]
        out += [Text(f"figure: {f.files[0]}", style="dim") for f in sec.figures]
        if sec.key in rep.lineage:
            out.append(lineage_tree(rep.lineage[sec.key]))
    if rep.headline:
        out.append(_headline_table(rep))
    if rep.index is not None:
        out.append(Text(f"index: {rep.index}", style="bold"))
    return out
