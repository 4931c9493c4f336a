"""``icl report``: every artifact kind rendered in the terminal, and with ``--out`` the paper's
figures (PNG + SVG) and an offline ``index.html`` with each artifact's parameters and lineage.

    from icl_cli.report import build_report
    rep = build_report(store, ["pipeline-clean"], out=Path("report"), with_inputs=True)
"""

from icl_cli.report.base import Contexts, Figure, Renderer, Section, Table, known_steps, register, renderer_for
from icl_cli.report.report import Report, build_report, report_json

__all__ = ["Contexts", "Figure", "Renderer", "Report", "Section", "Table", "build_report", "known_steps", "register",
           "renderer_for", "report_json"]
