"""``index.html``: the report as one self-contained page, readable offline.

No script and no external resource: the style sheet is inline and figures are referenced by
relative paths to the PNG files beside the page (each linked to its SVG).
"""

from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from icl_cli.report.base import Contexts, Section

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2.2em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h4{margin:1.2em 0 .3em}table{border-collapse:collapse;margin:.3em 0;font-size:13px}
th,td{padding:3px 9px;border-bottom:1px solid #e4e4e4}th{background:#f4f4f4}td.r,th.r{text-align:right}
td.l,th.l{text-align:left}.caption,.meta{color:#666;font-size:13px}figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{color:#444;font-size:13px;max-width:900px}
code{background:#f3f3f3;padding:0 3px;border-radius:3px}.ctx{font-family:ui-monospace,monospace;font-size:12.5px}
mark{background:#ffe066;font-weight:bold}details{margin:.6em 0}summary{cursor:pointer;color:#335}
nav a{margin-right:1em}ul.lineage{font-size:13px;margin:.2em 0}.note{background:#f6f8fb;border-left:3px solid #7aa0d8;padding:.4em .8em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _lineage(node: dict, via: str | None = None) -> str:
    names = f" ({_e(', '.join(node.get('names') or []))})" if node.get("names") else ""
    label = f"{_e(via) + ': ' if via else ''}<b>{_e(node.get('step') or 'missing')}</b> <code>{_e(node['key'][:12])}</code>{names}"
    kids = "".join(_lineage(child, name) for name, child in node.get("inputs", {}).items())
    return f"<li>{label}" + (f"<ul class='lineage'>{kids}</ul>" if kids else "") + "</li>"


def _contexts(c: Contexts) -> str:
    rows = []
    for value, tokens, fire in c.rows:
        toks = " ".join(f"<mark>{_e(t)}</mark>" if i == fire else _e(t) for i, t in enumerate(tokens))
        rows.append(f"<tr><td class='r'>{value:.2f}</td><td class='l ctx'>{toks}</td></tr>")
    return (f"<h4>{_e(c.title)}</h4><table><thead><tr><th class='r'>activation</th><th class='l'>context "
            f"(firing token marked)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _section(sec: Section, rep, out: Path, index: int) -> str:
    parts = [f"<h2 id='s{index}'>{_e(sec.title)}</h2>",
             f"<p class='meta'>{_e(sec.step)} artifact <code>{_e(sec.key)}</code></p>"]
    parts += [f"<p class='note'>{_e(n)}</p>" for n in sec.notes]
    for fig in sec.figures:
        img = fig.files[0]
        rel = os.path.relpath(img, out).replace(os.sep, "/")
        alt = [os.path.relpath(f, out).replace(os.sep, "/") for f in fig.files[1:]]
        links = " ".join(f"<a href='{_e(a)}'>{_e(Path(a).suffix[1:].upper())}</a>" for a in alt)
        parts.append(f"<figure><a href='{_e(rel)}'><img src='{_e(rel)}' alt='{_e(fig.title)}'></a>"
                     f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)} {links}</figcaption></figure>")
    params = [t for t in sec.tables if t.title == "parameters"]
    for t in sec.tables:
        if t.title != "parameters":
            parts.append(t.to_html())
    if sec.contexts:
        parts.append(f"<details open><summary>Max-activating contexts ({len(sec.contexts)} features)</summary>"
                     + "".join(_contexts(c) for c in sec.contexts) + "</details>")
    for t in params:
        parts.append("<details><summary>Parameters</summary>" + t.to_html() + "</details>")
    lin = rep.lineage.get(sec.key)
    if lin:
        parts.append(f"<details open><summary>Lineage</summary><ul class='lineage'>{_lineage(lin)}</ul></details>")
    return "\n".join(parts)


def _headline(rows: list[dict]) -> str:
    if not rows:
        return ""
    body = "".join(f"<tr><td class='l'>{_e(r['finding'])}</td><td class='l'>{_e(r['ours'])}</td><td class='l'>{_e(r['paper'])}</td></tr>"
                   for r in rows)
    return ("<h2 id='headline'>Headline findings</h2><table><thead><tr><th class='l'>finding</th><th class='l'>this run</th>"
            f"<th class='l'>paper (Gemma-1 2B)</th></tr></thead><tbody>{body}</tbody></table>")


def write_index(out: Path, rep, arts: list) -> Path:
    """Write ``out/index.html`` for the report ``rep``; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    models = sorted({str(a.params.get("model")) for a in arts if a.params.get("model")})
    nav = " ".join(f"<a href='#s{i}'>{_e(s.step)}</a>" for i, s in enumerate(rep.sections))
    body = [f"<h1>icl report{': ' + _e(', '.join(models)) if models else ''}</h1>",
            f"<p class='meta'>{len(rep.sections)} artifacts; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
            f"Figures are PNG (click for full size) with an SVG beside each.</p>",
            f"<nav>{nav}</nav>", _headline(rep.headline)]
    body += [_section(s, rep, out, i) for i, s in enumerate(rep.sections)]
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>icl report</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
