"""``icl report``: render artifacts in the terminal; with ``--out`` also the figures and index.html.

    icl report pipeline-clean                       # tables, heatmaps, contexts, lineage
    icl report pipeline-clean --inputs --out report # + every ancestor, figures, report/index.html
    INDEX=$(icl -q report KEY1 KEY2 --out report)   # -q: only the path of index.html
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from icl_cli.cli.context import emit, g, log


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)


def report_cmd(
    ctx: typer.Context,
    refs: List[str] = typer.Argument(..., help="Artifacts to report (keys, prefixes of ≥ 6 characters or names)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures (PNG + SVG) and index.html into this folder."),
    inputs: bool = typer.Option(False, "--inputs", help="Also report every artifact these were made from."),
    params: bool = typer.Option(False, "--params", help="Show each artifact's parameters in the terminal too."),
) -> None:
    """Render artifacts: tables, heatmaps, top features' contexts, lineage; figures and index.html with --out."""
    from icl_cli.report import build_report, report_json

    gl = g(ctx)
    rep = build_report(gl.store(), refs, out=out.resolve() if out else None, with_inputs=inputs,
                       progress=lambda m: log(f"rendering {m}", ctx_globals=gl))
    if rep.index is not None:
        log(f"report written: {rep.index}", ctx_globals=gl, style=None)
    emit(gl, report_json(rep), table=lambda: _terminal(rep, params), keys=[str(rep.index)] if rep.index else [])


def _terminal(rep, show_params: bool) -> list:
    from rich.rule import Rule
    from rich.text import Text

    from icl_cli.report.terminal import contexts_table, lineage_tree

    out = []
    for sec in rep.sections:
        out.append(Rule(Text(f"{sec.title}  ({sec.step} {sec.key[:12]})"), align="left"))
        out += [Text(n) for n in sec.notes]
        out += sec.terminal
        out += [t.to_rich() for t in sec.tables if show_params or t.title != "parameters"]
        out += [contexts_table(c) for c in sec.contexts]
        out += [Text(f"figure: {f.files[0]}", style="dim") for f in sec.figures]
        if sec.key in rep.lineage:
            out.append(lineage_tree(rep.lineage[sec.key]))
    if rep.headline:
        from rich.table import Table

        tab = Table(title="headline findings beside the paper's", title_justify="left")
        for col in ("finding", "this run", "paper (Gemma-1 2B)"):
            tab.add_column(col)
        for r in rep.headline:
            tab.add_row(r["finding"], r["ours"], r["paper"])
        out.append(tab)
    if rep.index is not None:
        out.append(Text(f"index: {rep.index}", style="bold"))
    return out
