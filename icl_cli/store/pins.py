"""Reader pins: a process that reads an artifact keeps ``gc`` (and ``store rm``) from deleting it.

    pin(root, key)                       # a step resolved `key` as an input: pinned until it exits
    with sweeping(root) as pinned:       # gc: while held, no new pin can be taken
        if key not in pinned: retire(key)

1. Each reading process owns one file ``root/.pins/<pid>.<rand>.pin``, locked (``flock
   LOCK_EX``) for as long as the process lives, listing one pinned key per line. The kernel drops
   the lock however the process dies (kill -9 included), so a pin file nobody locks is stale.
2. The file is created under a temporary name, locked, then renamed into place, so ``gc`` never
   sees an unlocked pin file of a live process.
3. Taking a pin and sweeping exclude each other through ``root/.pins/.lock``: a reader appends its
   key under ``LOCK_SH``, ``gc`` reads every pin file and moves unpinned artifacts to the trash
   under ``LOCK_EX``. A reader that pins, then finds its artifact still there, is safe; if gc
   moved it first, the reader sees it gone (the store then says so) instead of losing it later.
4. ``gc`` skips the pins of its own process (a test that resolves, then collects in-process).
5. A process that reads from many stores (a test session) keeps at most ``MAX_STORES`` pin files
   open; the least recently used one is closed (its pins end) beyond that.

Without ``fcntl`` (Windows) or flock there are no pins: gc then relies on its grace period alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from pathlib import Path
from typing import Iterator

from icl_cli.store.lock import held

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PINS = ".pins"
_GATE = ".lock"
_SUFFIX = ".pin"

MAX_STORES = 64

_guard = threading.Lock()
_own: dict[str, tuple[int, int, Path, set[str]]] = {}  # pins folder -> (pid, fd, file, keys pinned), LRU order


def _folder(root: Path) -> Path:
    return Path(root) / PINS


@contextlib.contextmanager
def _gate(root: Path, exclusive: bool) -> Iterator[bool]:
    """Hold ``.pins/.lock`` shared (readers) or exclusive (gc); yields False when flock is missing."""
    if fcntl is None:
        yield False
        return
    folder = _folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / _GATE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                yield False
                return
            raise
        yield True
    finally:
        os.close(fd)


def _own_file(folder: Path) -> tuple[int, Path, set[str]]:
    """This process's locked pin file in ``folder`` (created on first use; a forked child makes its own)."""
    entry = _own.get(str(folder))
    if entry is not None and entry[0] == os.getpid():
        _own[str(folder)] = _own.pop(str(folder))  # most recently used last
        return entry[1], entry[2], entry[3]
    while len(_own) >= MAX_STORES:
        _, (pid, fd, path, _) = next(iter(_own.items()))
        del _own[next(iter(_own))]
        if pid == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                os.close(fd)
    name = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmp = folder / f"{name}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: never contended
    path = folder / f"{name}{_SUFFIX}"
    os.rename(tmp, path)
    _own[str(folder)] = (os.getpid(), fd, path, set())
    return fd, path, _own[str(folder)][3]


def pin(root: Path, key: str) -> None:
    """Keep ``key`` from being swept by gc while this process lives (no-op if already pinned)."""
    if fcntl is None:
        return
    folder = _folder(root)
    with _guard:
        entry = _own.get(str(folder))
        if entry is not None and entry[0] == os.getpid() and key in entry[3]:
            return
        try:
            with _gate(root, exclusive=False) as ok:
                if not ok:
                    return
                fd, _, keys = _own_file(folder)
                os.write(fd, f"{key}\n".encode("ascii"))
                keys.add(key)
        except OSError:
            return  # a read-only store: reading still works, only gc protection is lost


def own_pins(root: Path) -> set[str]:
    """Keys this process pinned in the store at ``root``."""
    entry = _own.get(str(_folder(root)))
    return set(entry[3]) if entry is not None and entry[0] == os.getpid() else set()


def _read_live(folder: Path) -> tuple[set[str], list[Path]]:
    """(keys pinned by other live processes, stale pin files) — call while holding the gate."""
    mine = _own.get(str(folder))
    mine_path = mine[2] if mine is not None and mine[0] == os.getpid() else None
    keys: set[str] = set()
    stale = []
    for path in sorted(folder.glob(f"*{_SUFFIX}")):
        if path == mine_path:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                stale.append(path)  # nobody holds it: its process is gone
                continue
            except BlockingIOError:
                pass
            with os.fdopen(os.dup(fd), "r", encoding="ascii", errors="replace") as f:
                keys.update(line.strip() for line in f if line.strip())
        finally:
            os.close(fd)
    return keys, stale


@contextlib.contextmanager
def sweeping(root: Path) -> Iterator[set[str]]:
    """Hold off new pins; yields the keys pinned by other live processes (empty without flock)."""
    folder = _folder(root)
    if fcntl is None or not folder.is_dir():
        yield set()
        return
    with _gate(root, exclusive=True) as ok:
        if not ok:
            yield set()
            return
        keys, _ = _read_live(folder)
        yield keys


def pinned(root: Path) -> set[str]:
    """Keys pinned right now by other live processes (a snapshot: it may grow at once)."""
    with sweeping(root) as keys:
        return set(keys)


def sweep_stale(root: Path, dry_run: bool = False) -> list[str]:
    """Delete pin files of dead processes (and leftover temporary ones); returns their paths."""
    folder = _folder(root)
    if fcntl is None or not folder.is_dir():
        return []
    out = []
    with _gate(root, exclusive=True) as ok:
        if not ok:
            return []
        _, stale = _read_live(folder)
        for path in stale + [p for p in folder.glob("*.tmp") if _dead_tmp(p)]:
            out.append(str(path))
            if not dry_run:
                with contextlib.suppress(OSError):
                    path.unlink()
    return out


def _dead_tmp(path: Path) -> bool:
    """A temporary pin file whose creator is gone (it holds no lock)."""
    return held(path) is False
