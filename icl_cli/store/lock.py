"""One writer per key: an advisory lock file per artifact key, held while its step runs.

    with key_lock(root, key, on_wait=say):   # blocks while another process computes `key`
        ...                                  # check the store again, then build and publish

Two processes that compute the same key at once would otherwise share (and delete under each
other) the key's resumable work folder. The second one waits, then finds the artifact published
and reuses it.

1. The lock is ``flock(LOCK_EX)`` on ``root/.locks/<key>.lock``; the kernel drops it when its
   holder exits, however it dies (kill -9 included), so a crashed run never blocks the next one.
2. The holder writes its pid into the file (only to say whom a waiter waits for).
3. On release the holder unlinks the file *before* unlocking, so ``.locks`` stays empty. A waiter
   that locked a file which has meanwhile been unlinked (its inode is no longer the path's) has
   locked nothing useful: it closes it and tries again on a fresh file.
4. Locks are per open file, so one process taking the same key twice would wait on itself;
   :func:`key_lock` is therefore re-entrant within a thread (other threads wait like processes).

On systems without ``fcntl`` (Windows) or file systems without flock there is no lock: a concurrent writer of the same key can
then fail, but never publishes a partial artifact (publishing is an atomic rename).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCKS = ".locks"

_held: dict[tuple[int, str], int] = {}  # (thread, lock path) -> depth: re-entrance within a thread
_guard = threading.Lock()


def lock_path(root: Path, key: str) -> Path:
    return Path(root) / LOCKS / f"{key}.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _acquire(path: Path, on_wait: Optional[Callable[[str], None]]) -> int | None:
    """Open and lock ``path`` (waiting if needed); returns the locked descriptor, or None on a
    file system without flock (then there is no lock, as without fcntl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not told:
                    on_wait(_holder(path))
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    return None
                raise
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder unlinked it while we waited: lock the new file


@contextlib.contextmanager
def key_lock(root: Path, key: str, on_wait: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Hold the store-wide lock of ``key``; ``on_wait(holder)`` is called once if we must wait."""
    path = lock_path(root, key)
    ident = (threading.get_ident(), str(path))
    with _guard:
        depth = _held.get(ident, 0)
        if depth:
            _held[ident] = depth + 1
    if fcntl is None or depth:
        try:
            yield
        finally:
            if depth:
                with _guard:
                    _held[ident] -= 1
        return
    fd = _acquire(path, on_wait)
    with _guard:
        _held[ident] = 1
    try:
        yield
    finally:
        with _guard:
            del _held[ident]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # before unlocking: see point 3 of the module docstring
            os.close(fd)


def held(path: Path) -> bool | None:
    """Whether some process holds an flock on ``path`` right now (None: no such file). Locks and
    pins are both files whose holder keeps them locked, so a lock we can take means its holder is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor lets go of a lock we took
    return False


def is_locked(root: Path, key: str) -> bool:
    """Whether some process holds the lock of ``key`` right now (for gc)."""
    return fcntl is not None and bool(held(lock_path(root, key)))


def sweep_unheld(root: Path, dry_run: bool = False) -> list[str]:
    """Delete lock files nobody holds (left by a holder killed before it could unlink its file);
    returns their paths. Safe against waiters by point 3 of the module docstring: we lock, unlink,
    then unlock, exactly as a holder does."""
    folder = Path(root) / LOCKS
    if fcntl is None or not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.lock")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held (or no flock here)
            if not _same_file(fd, path):
                continue
            out.append(str(path))
            if not dry_run:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        finally:
            os.close(fd)
    return out
