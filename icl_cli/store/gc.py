"""Garbage collection: keep what names lead to, sweep the rest once it is old enough.

1. Kept = every named artifact, every artifact published within the last ``older_than_seconds``,
   and, recursively, every artifact any of those was made from (lineage never breaks).
2. Every other artifact is moved to ``.trash`` (one atomic rename, so readers never see half a
   folder) and deleted; so are folders of the layout whose manifest is missing or unreadable.
3. Staging folders of writers that are dead (the pid in their name is gone, or they are older
   than ``STAGING_MAX_AGE_S``) and ``.trash`` leftovers are deleted.
4. Work folders (checkpoints) are deleted once their artifact is published, or when no writer is
   alive for them (no staging folder of a live pid, no process holding the key's lock) and
   nothing in them changed during the grace period.
5. Names that point at artifacts no longer in the store are dropped.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from icl_cli.core.errors import IntegrityError
from icl_cli.store.fsutil import newest_mtime, remove_tree, tree_size
from icl_cli.store.keys import KEY_RE
from icl_cli.store.lock import is_locked

if TYPE_CHECKING:
    from icl_cli.store.store import Store

STAGING_MAX_AGE_S = 2 * 86400
"""A staging folder this old is swept even if a process with its pid is alive (pid reuse)."""


@dataclass
class GcReport:
    removed: list[dict[str, Any]] = field(default_factory=list)
    """Artifacts deleted (or that would be, with dry_run): key, step, created, size."""
    kept: int = 0
    """Artifacts left in place."""
    protected: int = 0
    """Of those, how many are named or in a named artifact's lineage."""
    staging: list[str] = field(default_factory=list)
    """Stale staging and trash folders deleted."""
    work: list[str] = field(default_factory=list)
    """Stale work (checkpoint) folders deleted."""
    names: list[str] = field(default_factory=list)
    """Names dropped because their artifact is gone."""
    freed_bytes: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _writer(path: Path) -> tuple[str, int]:
    """(key, pid) from a ``<key>.<pid>.<rand>`` folder name; ("", -1) when it does not parse."""
    parts = path.name.split(".")
    if len(parts) == 3 and KEY_RE.match(parts[0]) and parts[1].isdigit():
        return parts[0], int(parts[1])
    return "", -1


def _stale_writer_dir(path: Path, now: float) -> bool:
    _, pid = _writer(path)
    return not pid_alive(pid) or now - newest_mtime(path) > STAGING_MAX_AGE_S


def _finished(art) -> float:
    """When the artifact was published (creation is when its step started)."""
    try:
        return dt.datetime.fromisoformat(art.created).timestamp() + float(art.manifest.get("duration_s") or 0)
    except (TypeError, ValueError):
        return art.path.stat().st_mtime


def lineage_closure(store: "Store", roots: Iterable[str]) -> set[str]:
    """``roots`` and everything they were made from (inputs, recursively)."""
    todo = list(roots)
    seen: set[str] = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        try:
            art = store.get(key)
        except IntegrityError:
            continue  # unreadable manifest: its inputs are unknown
        if art is not None:
            todo += list(art.inputs.values())
    return seen


def collect_garbage(store: "Store", older_than_seconds: float, dry_run: bool = False) -> GcReport:
    now = time.time()
    cutoff = now - older_than_seconds
    report = GcReport(dry_run=dry_run)
    arts = store.artifacts()
    named = lineage_closure(store, store.names().values())
    # what is named or young stays, and so does everything it was made from
    keep = lineage_closure(store, list(named) + [a.key for a in arts if _finished(a) > cutoff])
    live_keys = set()

    for sub in (".staging", ".trash"):
        folder = store.root / sub
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if _stale_writer_dir(path, now):
                report.staging.append(str(path))
                report.freed_bytes += tree_size(path)
                if not dry_run:
                    remove_tree(path)
            elif sub == ".staging":
                live_keys.add(_writer(path)[0])

    for art in arts:
        if art.key in keep:
            report.kept += 1
            report.protected += art.key in named
            continue
        report.removed.append({"key": art.key, "step": art.step, "created": art.created, "size": art.size})
        report.freed_bytes += art.size
        if not dry_run:
            store._retire(art.key)
            try:
                art.path.parent.rmdir()  # the fan-out folder, if now empty
            except OSError:
                pass

    for key, problem in store.damaged().items():  # folders whose manifest is gone or unreadable
        path = store.artifact_path(key)
        if key not in keep and newest_mtime(path) <= cutoff:
            report.removed.append({"key": key, "step": None, "created": None, "size": tree_size(path), "problem": problem})
            report.freed_bytes += tree_size(path)
            if not dry_run:
                store._retire(key)

    work = store.root / ".work"
    for path in sorted(work.iterdir()) if work.is_dir() else []:
        published = store.get(path.name) is not None
        idle = path.name not in live_keys and not is_locked(store.root, path.name) and newest_mtime(path) <= cutoff
        if published or idle:
            report.work.append(str(path))
            report.freed_bytes += tree_size(path)
            if not dry_run:
                remove_tree(path)

    removed = {r["key"] for r in report.removed}
    for name, key in store.names().items():
        if key in removed or store.get(key) is None:
            report.names.append(name)
            if not dry_run:
                (store.root / ".names" / name).unlink(missing_ok=True)
    return report
