"""Cheap integrity checks of the artifacts a step reads: full sha256 once, then file metadata.

    check_intact(art)     # IntegrityError when a file differs from the manifest

Re-hashing every input of every command would cost seconds per gigabyte, so a full check is
remembered by each file's (size, mtime_ns, ctime_ns, inode):

1. In this process (a dict by key) and across processes (``root/.verified/<key>.json``, written
   after a full check passes, and right after publishing).
2. When every file's metadata still matches what was remembered, the artifact is taken as intact;
   any change (a write, ``touch``, a copy, a restore) forces a full sha256 of every file. The
   ctime cannot be set back by hand, so editing a file and restoring its mtime is caught too.
3. ``icl store verify`` always re-hashes (it also catches damage that left the metadata alone,
   such as bit rot on the disk).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol

from icl_cli.core.errors import IntegrityError
from icl_cli.store.fsutil import MANIFEST, atomic_write_text

VERIFIED = ".verified"

_guard = threading.Lock()
_memo: dict[tuple[str, str], dict[str, list[int]]] = {}  # (root, key) -> signature checked in full


class Checkable(Protocol):
    """What a check needs from an artifact (``artifact.Artifact`` is one)."""

    key: str
    path: Path
    files: dict[str, dict[str, Any]]

    @property
    def step(self) -> str: ...

    def problems(self) -> list[str]: ...


def signature(art: Checkable) -> dict[str, list[int]] | None:
    """{file: [size, mtime_ns, ctime_ns, inode]} of the manifest and every data file; None when one
    is missing."""
    out = {}
    for rel in [MANIFEST, *sorted(art.files)]:
        try:
            st = os.stat(art.path / rel)
        except OSError:
            return None
        out[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _cache_file(root: Path, key: str) -> Path:
    return Path(root) / VERIFIED / f"{key}.json"


def _remember(root: Path, key: str, sig: dict[str, list[int]]) -> None:
    with _guard:
        _memo[(str(root), key)] = sig
    try:
        atomic_write_text(_cache_file(root, key), json.dumps(sig, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only store: the check is repeated by the next process


def _remembered(root: Path, key: str) -> dict[str, list[int]] | None:
    with _guard:
        got = _memo.get((str(root), key))
    if got is not None:
        return got
    try:
        return json.loads(_cache_file(root, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def mark_intact(root: Path, art: Checkable) -> None:
    """Record that ``art`` was just hashed in full (after publishing it)."""
    sig = signature(art)
    if sig is not None:
        _remember(root, art.key, sig)


def forget(root: Path, key: str) -> None:
    """Drop what is remembered about ``key`` (it was deleted or replaced)."""
    with _guard:
        _memo.pop((str(root), key), None)
    try:
        _cache_file(root, key).unlink()
    except OSError:
        pass


def check_intact(root: Path, art: Checkable, advice: str) -> None:
    """IntegrityError (one line, ending with ``advice``) when a file of ``art`` is missing or differs
    from its manifest; a full sha256 only when the files changed since the last full check."""
    sig = signature(art)
    if sig is not None and _remembered(root, art.key) == sig:
        return
    bad = art.problems()
    if bad:
        forget(root, art.key)
        raise IntegrityError(f"artifact {art.key[:12]} ({art.step}) is damaged: {'; '.join(bad)}; {advice}")
    sig = signature(art)
    if sig is not None:
        _remember(root, art.key, sig)


def stale_entries(root: Path, live: set[str]) -> list[Path]:
    """Cache files of artifacts no longer in the store."""
    folder = Path(root) / VERIFIED
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir()) if p.name.removesuffix(".json") not in live]
