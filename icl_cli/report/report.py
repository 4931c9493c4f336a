"""Assemble a report: one section per artifact, its parameters and lineage, the headline findings,
and with an output folder the figures and ``index.html``.

    rep = build_report(store, ["pipeline-clean", "ab12cd"], out=Path("report"), with_inputs=True)
    rep.sections, rep.index   # index: the path of index.html (None without out)

Figures of an artifact already drawn into the same folder by the same renderer version are kept
(a record in ``<out>/report.json`` maps each key to its figures), so a rerun is quick.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from icl_cli.core.errors import IclError
from icl_cli.report.base import Figure, Section, Table, renderer_for, short_list

STEP_ORDER = ("import-model", "import-tasks", "train-sae", "import-sae", "collect", "top-activations", "clean", "steer",
              "ablate", "circuit", "faithfulness")
_RECORD = "report.json"


@dataclass
class Report:
    sections: list[Section]
    lineage: dict[str, dict]
    """key -> Store.lineage(key)."""
    params: dict[str, dict]
    """key -> the artifact's parameters."""
    headline: list[dict] = field(default_factory=list)
    """Rows {finding, ours, paper, match, key, step} gathered from the sections' summaries; ``match``
    is the "matches the paper?" cell (headline.verdict)."""
    setup: str = ""
    """The model(s) and set-up of this run, for the headline's "this run" column."""
    index: Path | None = None
    written: list[Path] = field(default_factory=list)
    """Every file written under the report folder by this call: index.html first, then figures and CSVs."""


def _ancestors(store, arts: list) -> list:
    seen = {a.key: a for a in arts}
    todo = list(arts)
    while todo:
        art = todo.pop()
        for key in art.inputs.values():
            if key not in seen and store.get(key) is not None:
                seen[key] = store.get(key)
                todo.append(seen[key])
    return list(seen.values())


def _order(art) -> int:
    return STEP_ORDER.index(art.step) if art.step in STEP_ORDER else len(STEP_ORDER)


def generic_section(art) -> Section:
    """Parameters and metrics only, for a step without a renderer."""
    sec = Section(art.key, art.step, f"{art.step} artifact", {"metrics": art.metrics})
    if art.metrics:
        rows = [[k, json.dumps(v)[:80]] for k, v in art.metrics.items()]
        sec.tables.append(Table("metrics", ["metric", "value"], rows, align="ll"))
    return sec


def params_table(art) -> Table:
    rows = []
    for k, v in sorted(art.params.items()):
        text = short_list(v, 10) if isinstance(v, (list, tuple)) else json.dumps(v) if isinstance(v, dict) else str(v)
        rows.append([k, text if len(text) <= 120 else text[:117] + "…"])
    for k, v in sorted(art.speed_params.items()):
        rows.append([f"{k} (speed only)", str(v)])
    return Table("parameters", ["parameter", "value"], rows, align="ll")


def _load_record(out: Path) -> dict:
    try:
        return json.loads((out / _RECORD).read_text())
    except (OSError, ValueError):
        return {}


def build_report(store, refs: Sequence[str], out: Path | None = None, with_inputs: bool = False,
                 progress: Callable[[str], None] | None = None, not_measured: Sequence[dict] = ()) -> Report:
    """Sections for the artifacts ``refs`` name (and, with ``with_inputs``, all their ancestors).

    not_measured: headline rows of findings a run could not measure (a skipped step: "finding",
    "paper", "why"), shown as "cannot detect" with their reason."""
    if not refs:
        raise IclError("name at least one artifact (a key, a prefix of ≥ 6 characters or a name); `icl store ls` lists them")
    arts = []
    for ref in refs:
        a = store.resolve(ref)
        if all(a.key != b.key for b in arts):
            arts.append(a)
    if with_inputs:
        arts = sorted(_ancestors(store, arts), key=_order)
    record = _load_record(out) if out is not None else {}
    sections = []
    for art in arts:
        if progress:
            progress(f"{art.step} {art.key[:8]}")
        sections.append(_section(art, out, record))
    from icl_cli.report.headline import model_setup, verdict

    rep = Report(sections, {a.key: store.lineage(a) for a in arts}, {a.key: a.params for a in arts})
    for sec in sections:
        for row in sec.summary.get("headline", []):
            rep.headline.append({**row, "match": verdict(row), "key": sec.key, "step": sec.step})
    for row in not_measured:
        row = {"ours": f"not measured: {row['why']}", **row, "detectable": False}
        rep.headline.append({**row, "match": verdict(row), "key": "", "step": ""})
    models = list(dict.fromkeys(str(a.params["model"]) for a in arts if a.params.get("model")))
    rep.setup = model_setup(models) if rep.headline and models else ", ".join(models)
    if out is not None:
        from icl_cli.report.html import write_index

        (out / _RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
        rep.index = write_index(out, rep, [a for a in arts])
        rep.written = [rep.index, *rep.written, *(p for s in sections for f in s.figures for p in f.files)]
    return rep


def _section(art, out: Path | None, record: dict) -> Section:
    r = renderer_for(art.step)
    if r is None:
        sec = generic_section(art)
    elif out is None:
        sec = r.section(art, None)
    else:
        from icl_cli.report.figures import STYLE_VERSION

        version = [r.version, STYLE_VERSION]
        cached = record.get(art.key)
        ok = (cached and cached.get("version") == version
              and all((out / f).exists() for fig in cached["figures"] for f in fig["files"]))
        if ok:
            sec = r.section(art, None)
            sec.figures = [Figure(f["title"], f["caption"], [out / x for x in f["files"]]) for f in cached["figures"]]
        else:
            sec = r.section(art, out / "figures")
            record[art.key] = {"version": version, "figures": [
                {"title": f.title, "caption": f.caption, "files": [p.relative_to(out).as_posix() for p in f.files]}
                for f in sec.figures]}
    sec.tables.append(params_table(art))
    return sec


def report_json(rep: Report) -> dict[str, Any]:
    """The JSON document of ``icl --json report``."""
    return {
        "index": str(rep.index) if rep.index else None,
        "setup": rep.setup,
        "headline": rep.headline,
        "written": [str(p) for p in rep.written],
        "artifacts": [{"key": s.key, "step": s.step, "title": s.title, "summary": s.summary, "notes": s.notes,
                       "figures": [{"title": f.title, "files": [str(p) for p in f.files]} for f in s.figures],
                       "lineage": rep.lineage.get(s.key), "params": rep.params.get(s.key)} for s in rep.sections],
    }
