"""Garbage collection: keep what names lead to, sweep the rest once it is old enough.

1. Kept = every named artifact, every artifact published within the last ``older_than_seconds``,
   every artifact a running process reads (its reader pin, pins.py), and, recursively, every
   artifact any of those was made from (lineage never breaks).
2. Every other artifact is moved to ``.trash`` (one atomic rename, so readers never see half a
   folder) and deleted. While gc decides and moves, no process can take a new pin (pins.py), so
   a step never loses an input it has started to read.
3. Folders of the layout whose manifest is missing or unreadable are damaged beyond use: they are
   deleted whatever their age and names (named or not, nothing can read them).
4. Staging folders of writers that are dead (the pid in their name is gone, or they are older
   than ``STAGING_MAX_AGE_S``) and ``.trash`` leftovers are deleted.
5. Work folders (checkpoints) are deleted once their artifact is published, or when no writer is
   alive for them (no staging folder of a live pid, no process holding the key's lock) and
   nothing in them changed during the grace period.
6. Lock files nobody holds, pin files of dead processes and check records of deleted artifacts
   are deleted; names that point at artifacts no longer in the store are dropped.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from icl_cli.core.errors import IntegrityError
from icl_cli.store import integrity, pins
from icl_cli.store.artifact import Artifact
from icl_cli.store.fsutil import newest_mtime, remove_tree, tree_size
from icl_cli.store.keys import KEY_RE
from icl_cli.store.lock import is_locked, sweep_unheld


class GcStore(Protocol):
    """What gc needs from the store (``store.Store`` is one); declared here so that gc needs
    nothing above it."""

    root: Path

    def artifacts(self, step: str | None = None) -> list[Artifact]: ...

    def get(self, key: str) -> Artifact | None: ...

    def names(self) -> dict[str, str]: ...

    def damaged(self) -> dict[str, str]: ...

    def artifact_path(self, key: str) -> Path: ...

    def trash(self, key: str) -> Path | None: ...

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
    in_use: int = 0
    """Artifacts kept only because a running process reads them (or what they were made from)."""
    locks: list[str] = field(default_factory=list)
    """Lock and pin files nobody holds any more, deleted."""
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


def _finished(art: Artifact) -> float:
    """When the artifact was published (creation is when its step started)."""
    try:
        return dt.datetime.fromisoformat(art.created).timestamp() + float(art.manifest.get("duration_s") or 0)
    except (TypeError, ValueError):
        return art.path.stat().st_mtime


def lineage_closure(store: GcStore, roots: Iterable[str]) -> set[str]:
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


def _get(store: GcStore, key: str) -> Artifact | None:
    try:
        return store.get(key)
    except IntegrityError:
        return None  # an unreadable manifest: swept as damaged


def collect_garbage(store: GcStore, older_than_seconds: float, dry_run: bool = False) -> GcReport:
    now = time.time()
    cutoff = now - older_than_seconds
    report = GcReport(dry_run=dry_run)
    live_keys = set()
    trashed: list[Path] = []

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

    # no new reader pin while we decide and move (pins.py); deleting the moved folders comes after
    with pins.sweeping(store.root) as in_use:
        arts = store.artifacts()
        named = lineage_closure(store, store.names().values())
        # what is named, young or being read stays, and so does everything it was made from
        wanted = lineage_closure(store, list(named) + [a.key for a in arts if _finished(a) > cutoff])
        keep = wanted | lineage_closure(store, in_use)
        for art in arts:
            if art.key in keep:
                report.kept += 1
                report.protected += art.key in named
                report.in_use += art.key not in wanted
                continue
            report.removed.append({"key": art.key, "step": art.step, "created": art.created, "size": art.size})
            report.freed_bytes += art.size
            if not dry_run:
                trashed.append(store.trash(art.key))

        for key, problem in store.damaged().items():  # folders whose manifest is gone or unreadable
            path = store.artifact_path(key)
            size = tree_size(path)
            report.removed.append({"key": key, "step": None, "created": None, "size": size, "problem": problem})
            report.freed_bytes += size
            if not dry_run:
                trashed.append(store.trash(key))
    for path in trashed:
        if path is not None:
            remove_tree(path)

    work = store.root / ".work"
    for path in sorted(work.iterdir()) if work.is_dir() else []:
        published = _get(store, path.name) is not None
        idle = path.name not in live_keys and not is_locked(store.root, path.name) and newest_mtime(path) <= cutoff
        if published or idle:
            report.work.append(str(path))
            report.freed_bytes += tree_size(path)
            if not dry_run:
                remove_tree(path)

    removed = {r["key"] for r in report.removed}
    for name, key in store.names().items():
        if key in removed or _get(store, key) is None:
            report.names.append(name)
            if not dry_run:
                (store.root / ".names" / name).unlink(missing_ok=True)

    report.locks = sweep_unheld(store.root, dry_run) + pins.sweep_stale(store.root, dry_run)
    if not dry_run:
        for path in integrity.stale_entries(store.root, set(store_keys(store))):
            path.unlink(missing_ok=True)
    return report


def store_keys(store: GcStore) -> list[str]:
    """Keys of every artifact folder in the layout (readable or not)."""
    return [a.key for a in store.artifacts()] + list(store.damaged())
