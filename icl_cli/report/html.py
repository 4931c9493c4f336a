"""``index.html``: the report as one self-contained page, readable offline.

No script and no external resource: the style sheet is inline and figures are referenced by
relative paths to the PNG files beside the page (each linked to its SVG). A table longer than
``MAX_ROWS`` shows its first rows and links a CSV of all of them, written under ``tables/``
beside the page. Each feature's max-activating contexts are shown once, where they first
appear; a later section points back to them.
"""

from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from icl_cli.report.base import Contexts, Section, Table
from icl_cli.report.headline import verdict_word

MAX_ROWS = 50
"""At most this many rows of a table on the page; the rest are in its CSV."""
SHOWN_WIDTH = 1180
"""Width (CSS px) of the page's content: figures are drawn at about this width (figures.save)."""

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2.2em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h4{margin:1.2em 0 .3em}table{border-collapse:collapse;margin:.3em 0;font-size:13px}
th,td{padding:3px 9px;border-bottom:1px solid #e4e4e4}th{background:#f4f4f4}td.r,th.r{text-align:right}
td.l,th.l{text-align:left}.caption,.meta{color:#666;font-size:13px}figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{color:#444;font-size:13px;max-width:900px}
code{background:#f3f3f3;padding:0 3px;border-radius:3px}.ctx{font-family:ui-monospace,monospace;font-size:12.5px}
mark{background:#ffe066;font-weight:bold}details{margin:.6em 0}summary{cursor:pointer;color:#335}
nav a{margin-right:1em;white-space:nowrap}ul.lineage{font-size:13px;margin:.2em 0}.note{background:#f6f8fb;border-left:3px solid #7aa0d8;padding:.4em .8em}
.wide{overflow-x:auto}td.v-yes{background:#e3f4e1}td.v-partly{background:#fdf3d7}td.v-no{background:#fbe2e0}
td.v-cannot{background:#eceff4}td.v-nofig{background:#f4f4f4}
"""
_VERDICT_CLASS = {"yes": "v-yes", "partly": "v-partly", "no": "v-no", "cannot detect": "v-cannot", "no paper figure": "v-nofig"}


def _e(x: Any) -> str:
    return html.escape(str(x))


def _lineage(node: dict, via: str | None = None, seen: set | None = None) -> str:
    """The lineage tree as nested lists; an artifact already listed higher up is named again
    without its inputs ("inputs listed above"), so shared ancestors (a suite) appear once."""
    seen = set() if seen is None else seen
    names = f" ({_e(', '.join(node.get('names') or []))})" if node.get("names") else ""
    label = f"{_e(via) + ': ' if via else ''}<b>{_e(node.get('step') or 'missing')}</b> <code>{_e(node['key'][:12])}</code>{names}"
    inputs = node.get("inputs", {})
    if node["key"] in seen and inputs:
        return f"<li>{label} <span class='meta'>(inputs listed above)</span></li>"
    seen.add(node["key"])
    kids = "".join(_lineage(child, name, seen) for name, child in inputs.items())
    return f"<li>{label}" + (f"<ul class='lineage'>{kids}</ul>" if kids else "") + "</li>"


def _count(node: dict) -> int:
    return 1 + sum(_count(c) for c in node.get("inputs", {}).values())


def _contexts(c: Contexts) -> str:
    rows = []
    for value, tokens, fire in c.rows:
        toks = " ".join(f"<mark>{_e(t)}</mark>" if i == fire else _e(t) for i, t in enumerate(tokens))
        rows.append(f"<tr><td class='r'>{value:.3g}</td><td class='l ctx'>{toks}</td></tr>")
    return (f"<h4>{_e(c.title)}</h4><table><thead><tr><th class='r'>activation</th><th class='l'>context "
            f"(firing token marked)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def c_titles(cs: list[Contexts]) -> str:
    """'antonyms, en_es' from context titles 'antonyms: feature …' (the tasks that also chose them)."""
    heads = [c.title.split(":", 1)[0] for c in cs if ":" in c.title and not c.title.startswith("feature")]
    return "the top features of " + ", ".join(dict.fromkeys(heads)) if heads else "these features"


def nav_label(sec: Section, params: dict | None = None) -> str:
    """What the navigation calls a section: its kind, layer and tasks (not only its step)."""
    if sec.label:
        return sec.label
    p = params or {}
    layer = f" L{p['layer']}" if p.get("layer") is not None else ""
    if sec.step == "clean":
        return f"clean{layer} {'detector' if p.get('detectors') else 'task'} vectors"
    if sec.step == "steer":
        return f"steer{layer} {p.get('mode') or 'executor'}"
    if sec.step == "ablate":
        kind = p.get("kind") or "features"
        what = {"mass": "mass", "link": "link"}.get(kind, "cross-task" if p.get("cross_task") else "ablation")
        return f"ablate {what}" + (f" ({sec.summary.get('set')})" if kind == "mass" and sec.summary.get("set") else "")
    if sec.step in ("circuit",):
        tasks = p.get("tasks") or p.get("task") or []
        return f"circuit {', '.join(tasks) if isinstance(tasks, list) else tasks}"
    if sec.step in ("import-sae", "train-sae"):
        site, lay = sec.summary.get("site") or p.get("site"), sec.summary.get("layer", p.get("layer"))
        return f"SAE {site or ''} L{lay}".replace("  ", " ") if lay is not None else "SAE"
    if sec.step == "collect":
        return f"collect ({len(sec.summary.get('best_layer', {}))} tasks)" if sec.summary.get("best_layer") else "collect"
    return sec.step


def display_value(text: str, roots: dict[str, str]) -> str:
    """A parameter value as shown: artifact keys (64 hex digits) cut to 12, absolute paths under a
    known folder written relative to it (``roots``: folder -> the name shown for it)."""
    import re

    text = re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1", text)
    for root, name in roots.items():
        if len(root.rstrip(os.sep)) > 1:  # never "/" itself
            text = text.replace(root.rstrip(os.sep) + os.sep, name + "/")
    return text


def _roots(out: Path) -> dict[str, str]:
    import tempfile

    import icl_cli

    return {str(Path(icl_cli.__file__).resolve().parent): "icl_cli", str(Path.cwd()): ".",
            str(Path(tempfile.gettempdir()).resolve()): "$TMPDIR", str(Path.home()): "~"}


def params_with_inputs(t: Table, lineage: dict) -> Table:
    """The parameters table with a parameter the user left unset (None) shown as the artifact that
    the lineage has under that name (an input, or an input's input), so it agrees with the
    lineage: not "sae None" beside an SAE."""
    found: dict[str, dict[str, str]] = {}

    def walk(node: dict, depth: int) -> None:
        for name, child in node.get("inputs", {}).items():
            found.setdefault(name, {}).setdefault(child["key"], f"{child.get('step') or 'input'} {child['key'][:12]}"
                                                  + (" (input)" if depth == 0 else " (an input's input)"))
            walk(child, depth + 1)

    walk(lineage or {}, 0)
    rows = []
    for name, value in t.rows:
        if value == "None" and name in found:
            keys = found[name]
            value = next(iter(keys.values())) if len(keys) == 1 else f"{len(keys)} artifacts (see the lineage)"
        rows.append([name, value])
    return Table(t.title, t.columns, rows, t.caption, t.align)


def _table_html(t: Table, sec: Section, out: Path, rep, n: int) -> str:
    roots = _roots(out)
    t = Table(t.title, t.columns, [[display_value(v, roots) for v in row] for row in t.rows], t.caption, t.align)
    if len(t.rows) <= MAX_ROWS:
        return t.to_html()
    import re

    slug = re.sub(r"[^a-z0-9]+", "-", t.title.lower()).strip("-")[:48] or "table"
    path = t.write_csv(out / "tables" / f"{sec.step}-{sec.key[:8]}-{n}-{slug}.csv")
    rep.written.append(path)
    return t.to_html(MAX_ROWS, os.path.relpath(path, out).replace(os.sep, "/"))


def _png_width(path: Path) -> int | None:
    """Pixel width of a PNG, from its header (no image library needed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else None


def _section(sec: Section, rep, out: Path, index: int, shown: dict) -> str:
    parts = [f"<h2 id='s{index}'>{_e(sec.title)}</h2>",
             f"<p class='meta'>{_e(sec.step)} artifact <code>{_e(sec.key)}</code></p>"]
    parts += [f"<p class='note'>{_e(n)}</p>" for n in sec.notes]
    for fig in sec.figures:
        img = fig.files[0]
        rel = os.path.relpath(img, out).replace(os.sep, "/")
        alt = [os.path.relpath(f, out).replace(os.sep, "/") for f in fig.files[1:]]
        links = " ".join(f"<a href='{_e(a)}'>{_e(Path(a).suffix[1:].upper())}</a>" for a in alt)
        px = _png_width(img)  # drawn at 150 dpi for a 1.5x screen: shown at two thirds of its pixels
        width = f" width='{round(px / 1.5)}'" if px else ""
        parts.append(f"<figure><a href='{_e(rel)}'><img src='{_e(rel)}'{width} alt='{_e(fig.title)}'></a>"
                     f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)} {links}</figcaption></figure>")
    params = [t for t in sec.tables if t.title == "parameters"]
    for n, t in enumerate(sec.tables):
        if t.title != "parameters":
            parts.append(_table_html(t, sec, out, rep, n))
    fresh, again = [], []  # a feature's contexts are shown once in the page; later mentions point back
    for c in sec.contexts:
        if c.feature is not None and (c.sae, c.feature) in shown:
            again.append(c)
            continue
        fresh.append(c)
        if c.feature is not None:
            shown[(c.sae, c.feature)] = index
    if fresh:
        parts.append(f"<details open><summary>Max-activating contexts ({len(fresh)} features)</summary>"
                     + "".join(_contexts(c) for c in fresh) + "</details>")
    if again:
        refs = ", ".join(dict.fromkeys(f"<a href='#s{shown[(c.sae, c.feature)]}'>{_e(c.feature)}</a>" for c in again))
        parts.append(f"<p class='caption'>Max-activating contexts of {_e(c_titles(again))}: features {refs}, shown "
                     "above.</p>")
    for t in params:
        t = params_with_inputs(t, rep.lineage.get(sec.key) or {})
        roots = _roots(out)
        t = Table(t.title, t.columns, [[k, display_value(v, roots)] for k, v in t.rows], t.caption, t.align)
        parts.append("<details><summary>Parameters</summary>" + t.to_html() + "</details>")
    lin = rep.lineage.get(sec.key)
    if lin:
        n = _count(lin)
        parts.append(f"<details{' open' if n <= 12 else ''}><summary>Lineage ({n} artifacts)</summary>"
                     f"<ul class='lineage'>{_lineage(lin)}</ul></details>")
    return "\n".join(parts)


def _headline(rows: list[dict], setup: str) -> str:
    if not rows:
        return ""
    body = []
    for r in rows:
        word = verdict_word(r.get("match", ""))
        cls = _VERDICT_CLASS.get(word, "")
        body.append(f"<tr><td class='l'>{_e(r['finding'])}</td><td class='l'>{_e(r['ours'])}</td>"
                    f"<td class='l {cls}'>{_e(r.get('match', ''))}</td><td class='l'>{_e(r['paper'])}</td></tr>")
    this_run = "this run" + (f" ({_e(setup)})" if setup else "")
    return ("<h2 id='headline'>Headline findings</h2><table><thead><tr><th class='l'>finding</th>"
            f"<th class='l'>{this_run}</th><th class='l'>matches the paper?</th><th class='l'>paper (Gemma-1 2B)</th></tr>"
            f"</thead><tbody>{''.join(body)}</tbody></table>")


def write_index(out: Path, rep, arts: list) -> Path:
    """Write ``out/index.html`` for the report ``rep`` (and the CSVs of its long tables); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    models = sorted({str(a.params.get("model")) for a in arts if a.params.get("model")})
    nav = " ".join(f"<a href='#s{i}'>{_e(nav_label(s, rep.params.get(s.key)))}</a>" for i, s in enumerate(rep.sections))
    shown: dict = {}
    sections = [_section(s, rep, out, i, shown) for i, s in enumerate(rep.sections)]
    body = [f"<h1>icl report{': ' + _e(', '.join(models)) if models else ''}</h1>",
            f"<p class='meta'>{len(rep.sections)} artifacts reported; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
            f"Figures are PNG (click for full size) with an SVG beside each.</p>",
            f"<nav>{nav}</nav>", _headline(rep.headline, rep.setup)]
    body += sections
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>icl report</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
