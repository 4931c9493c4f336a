"""``icl store``: list, inspect, verify, name, import, export and sweep artifacts.

    icl store ls --step collect
    icl --json store show tv-antonyms --tree
    icl store verify --all
    KEY=$(icl -q store import ./my-sae --kind sae --name sae-l12)
    icl store tag 3fa9c2 best-tv
    icl store export best-tv ./out
    icl store gc --older-than 7d --dry-run
    icl store rm 3fa9c2                      # one artifact, even a damaged one
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from icl_cli.cli.context import Globals, emit, g, log
from icl_cli.core.errors import IclError, IntegrityError
from icl_cli.store.imports import KINDS
from icl_cli.store.integrity import mark_intact

app = typer.Typer(help="The content-hashed artifact store.", no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``90m``, ``12h``, ``14d``, ``2w`` (a bare number is seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration; use e.g. 30s, 90m, 12h, 14d or 2w")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _when(iso: str) -> str:
    try:
        return dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return iso or "?"


def _say(gl: Globals):
    return lambda message: log(message, ctx_globals=gl)


def _lite(art, names: list[str]) -> dict[str, Any]:
    """The short JSON form of an artifact (``ls``, ``import``)."""
    return {
        "key": art.key,
        "step": art.step,
        "names": names,
        "created": art.created,
        "size": art.size,
        "params": art.params,
        "inputs": art.inputs,
        "metrics": art.metrics,
        "path": str(art.path),
    }


@app.command("ls")
def ls_cmd(ctx: typer.Context, step: Optional[str] = typer.Option(None, "--step", help="Only artifacts of this step.")) -> None:
    """List the artifacts in the store, oldest first."""
    gl = g(ctx)
    store = gl.store()
    arts = store.artifacts(step)
    by_key: dict[str, list[str]] = {}
    for name, key in store.names().items():
        by_key.setdefault(key, []).append(name)
    rows = [_lite(a, by_key.get(a.key, [])) for a in arts]
    if not rows:
        log(f"no artifacts{' of step ' + step if step else ''} in {store.root}", ctx_globals=gl)

    def table() -> Table:
        t = Table(box=None, header_style="bold")
        for col in ("key", "step", "names", "created", "size"):
            t.add_column(col, justify="right" if col == "size" else "left", no_wrap=col != "names")
        for r in rows:
            t.add_row(r["key"][:12], r["step"], ", ".join(r["names"]), _when(r["created"]), human_size(r["size"]))
        return t

    emit(gl, data=rows, table=table if rows else None, keys=[r["key"] for r in rows])


def _lineage_tree(node: dict[str, Any], label: str = "") -> Tree:
    names = f" [{', '.join(node.get('names') or [])}]" if node.get("names") else ""
    text = f"{label}{node['key'][:12]}  {node.get('step') or 'missing'}{names}"
    tree = Tree(Text(text))
    for name, child in node.get("inputs", {}).items():
        tree.children.append(_lineage_tree(child, f"{name}: "))
    return tree


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Full key, unique prefix (>= 6 chars) or name."),
    tree: bool = typer.Option(False, "--tree", help="Also show the lineage (what it was made from)."),
) -> None:
    """Show one artifact: its manifest, where it lies, and optionally its lineage."""
    gl = g(ctx)
    store = gl.store()
    art = store.resolve(ref, check=False)
    data: dict[str, Any] = {"key": art.key, "step": art.step, "path": str(art.path), "names": art.names, "manifest": art.manifest}
    if tree:
        data["lineage"] = store.lineage(art)

    def render():
        m = art.manifest
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        inputs = ", ".join(f"{n}: {k[:12]}" for n, k in art.inputs.items()) or "-"
        code = m.get("code", {})
        rows = [
            ("key", art.key),
            ("step", f"{art.step} (version {m.get('version')})"),
            ("names", ", ".join(data["names"]) or "-"),
            ("path", str(art.path)),
            ("created", f"{_when(art.created)} ({m.get('duration_s')} s)"),
            ("code", f"icl_cli {code.get('icl_cli')} {(code.get('git_commit') or '')[:12]}".strip()),
            ("env", " ".join(f"{k}={v}" for k, v in m.get("env", {}).items() if v is not None)),
            ("inputs", inputs),
            ("params", json.dumps(art.params, sort_keys=True)),
            ("speed", json.dumps(art.speed_params, sort_keys=True)),
            ("metrics", json.dumps(art.metrics, sort_keys=True)),
            ("files", ", ".join(f"{f} ({human_size(i['size'])})" for f, i in art.files.items()) or "-"),
        ]
        for k, v in rows:
            t.add_row(k, Text(v))
        return [t, _lineage_tree(data["lineage"])] if tree else t

    emit(gl, data=data, table=render, keys=[art.key])


@app.command("verify")
def verify_cmd(
    ctx: typer.Context,
    ref: Optional[str] = typer.Argument(None, help="Artifact to check (key, prefix or name); none: every artifact."),
    all_: bool = typer.Option(False, "--all", help="Check every artifact in the store (what no REF does too)."),
) -> None:
    """Re-hash files against their manifests (every artifact when no REF is given); exit 3 naming any damaged file."""
    gl = g(ctx)
    if ref is not None and all_:
        raise typer.BadParameter("give one artifact REF or --all, not both")
    all_ = all_ or ref is None
    store = gl.store()
    arts = store.artifacts() if all_ else [store.resolve(ref, check=False)]
    rows = []
    for a in arts:
        problems = a.problems()
        rows.append({"key": a.key, "step": a.step, "ok": not problems, "problems": problems})
    if all_:  # folders whose manifest itself is missing or unreadable
        rows += [{"key": k, "step": None, "ok": False, "problems": [p]} for k, p in store.damaged().items()]

    def table() -> Table:
        t = Table(box=None, header_style="bold")
        for col in ("key", "step", "status"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["key"][:12], r["step"] or "?", Text("ok", style="green") if r["ok"] else Text("; ".join(r["problems"]), style="red"))
        return t

    emit(gl, data=rows, table=table, keys=[r["key"] for r in rows])
    bad = [r for r in rows if not r["ok"]]
    for a, r in zip(arts, rows):
        if r["ok"]:
            mark_intact(store.root, a)  # steps then skip re-hashing these files
    if bad:
        detail = "; ".join(f"{r['key'][:12]}: {', '.join(r['problems'])}" for r in bad[:5])
        raise IntegrityError(f"{len(bad)} damaged artifact(s): {detail}; remove each with `icl store rm KEY` "
                             f"(or all at once with `icl store gc`), then rerun the steps that made them")
    log(f"{len(rows)} artifact(s) verified", ctx_globals=gl)


@app.command("gc")
def gc_cmd(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be deleted."),
    yes: bool = typer.Option(False, "--yes", help="Really delete."),
    older_than: str = typer.Option("14d", "--older-than", help="Grace period: keep anything newer (s/m/h/d/w)."),
) -> None:
    """Delete artifacts that no name leads to and stale staging/work folders."""
    gl = g(ctx)
    seconds = parse_duration(older_than)
    store = gl.store()
    if not dry_run and not yes:
        preview = store.gc(seconds, dry_run=True)
        if not (preview.removed or preview.staging or preview.work or preview.names or preview.locks):
            dry_run = True  # nothing to delete: say so and succeed, without asking for --yes
        else:
            raise IclError(
                f"gc would delete {len(preview.removed)} artifact(s) and {len(preview.staging) + len(preview.work)} "
                f"scratch folder(s), {human_size(preview.freed_bytes)}; pass --yes to delete, or --dry-run to list them"
            )
    report = store.gc(seconds, dry_run=dry_run)

    def table() -> Table:
        t = Table(box=None, header_style="bold", title="would delete" if dry_run else "deleted")
        for col in ("what", "step", "created", "size"):
            t.add_column(col)
        for r in report.removed:
            t.add_row(r["key"][:12], r["step"] or "damaged", _when(r["created"]), human_size(r["size"]))
        for p in report.staging + report.work:
            t.add_row(Path(p).parent.name + "/" + Path(p).name[:12], "-", "-", "-")
        return t

    anything = report.removed or report.staging or report.work or report.names or report.locks
    nothing = lambda: Text(f"nothing to delete in {store.root} (grace period {older_than})")  # noqa: E731
    emit(gl, data=report.to_json(), table=table if anything else nothing, keys=[r["key"] for r in report.removed])
    verb = "would free" if dry_run else "freed"
    log(f"{len(report.removed)} artifact(s), {len(report.staging) + len(report.work)} scratch folder(s); "
        f"{verb} {human_size(report.freed_bytes)}; kept {report.kept} ({report.protected} named or in named lineage"
        f"{f', {report.in_use} read by a running step' if report.in_use else ''})", ctx_globals=gl)


@app.command("rm")
def rm_cmd(ctx: typer.Context, ref: str = typer.Argument(..., help="Artifact to delete (key, prefix or name), damaged or not.")) -> None:
    """Delete one artifact and the names pointing at it (refused while a running step reads it)."""
    gl = g(ctx)
    key, names = gl.store().remove(ref)
    said = f" and its name(s) {', '.join(names)}" if names else ""
    emit(gl, data={"key": key, "names": names}, table=lambda: Text(f"removed {key[:12]}{said}"), keys=[key])


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise typer.BadParameter(f"{kind!r} is not a kind; choose one of: {', '.join(KINDS)}")
    return kind


@app.command("import")
def import_cmd(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="File or folder to import."),
    kind: str = typer.Option(..., "--kind", callback=_check_kind, help="; ".join(f"{k.name}: {k.help}" for k in KINDS.values())),
    name: Optional[str] = typer.Option(None, "--name", help="Also name the artifact."),
    force: bool = typer.Option(False, "--force", help="Import again, replacing an earlier (e.g. damaged) import."),
) -> None:
    """Bring an existing file or folder (an SAE, task vectors, a model, tasks) into the store."""
    gl = g(ctx)
    res = gl.store().import_path(path, kind, name=name, log=_say(gl), force=force)
    art = res.artifact
    data = dict(_lite(art, art.names), reused=res.reused)
    emit(gl, data=data, table=lambda: Text(f"{art.key}  {art.step}  {', '.join(art.names)}".rstrip()), keys=[art.key])


@app.command("import-suite")
def import_suite_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="toy-icl-suite, or a suite folder (manifest.json + one SAELens folder per dictionary)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name the suite NAME and each dictionary NAME.KIND.LAYER (default: the suite's own name)."),
    force: bool = typer.Option(False, "--force", help="Import every dictionary again, replacing damaged earlier imports."),
) -> None:
    """Import a dictionary suite (resid / attn / transcoder per layer) for `icl circuit --saes`."""
    from icl_cli.dictionaries.suite import KINDS, import_suite, suite_name

    gl = g(ctx)
    suite = import_suite(gl.store(), ref, name=name or suite_name(ref), log=_say(gl), force=force)
    rows = [{"kind": k, "layer": layer, "key": key, "name": f"{suite.name}.{k}.{layer}"}
            for (k, layer), key in sorted(suite.member_keys.items(), key=lambda kv: (kv[0][1], KINDS.index(kv[0][0])))]

    def table() -> Table:
        t = Table(title=f"suite {suite.name} ({suite.model}) {suite.key[:12]}")
        for col in ("kind", "layer", "name", "key"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["kind"], str(r["layer"]), r["name"], r["key"][:12])
        return t

    emit(gl, data={"key": suite.key, "name": suite.name, "model": suite.model, "dictionaries": rows},
         table=table, keys=[suite.key])


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Artifact to export (key, prefix or name)."),
    dest: Path = typer.Argument(..., help="New folder to copy its files into (manifest included)."),
) -> None:
    """Copy an artifact's files out of the store as ordinary writable files."""
    gl = g(ctx)
    store = gl.store()
    art = store.resolve(ref)
    out = store.export(art, dest)
    emit(gl, data={"key": art.key, "step": art.step, "path": str(out)}, table=lambda: Text(str(out)), keys=[art.key])


@app.command("tag")
def tag_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Artifact to name (key, prefix or name)."),
    name: str = typer.Argument(..., help="The name (moved if it pointed elsewhere)."),
) -> None:
    """Name an artifact; named artifacts and their lineage survive gc."""
    gl = g(ctx)
    art = gl.store().tag(ref, name)
    emit(gl, data={"name": name, "key": art.key, "step": art.step}, table=lambda: Text(f"{name} -> {art.key[:12]} ({art.step})"), keys=[art.key])


@app.command("untag")
def untag_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="Name to remove.")) -> None:
    """Remove a name (the artifact stays until gc sweeps it)."""
    gl = g(ctx)
    key = gl.store().untag(name)
    emit(gl, data={"name": name, "key": key}, table=lambda: Text(f"removed {name} (was {key[:12]})"), keys=[key])
