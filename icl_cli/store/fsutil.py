"""File-system helpers of the store: hashing, fsync, read-only trees, atomic small writes."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
from pathlib import Path

_CHUNK = 1 << 20
MANIFEST = "manifest.json"


def hash_file(path: Path, fsync: bool = False) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file; ``fsync`` also flushes it to disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest(), size


def tree_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``root``, sorted (the manifest excluded)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                raise OSError(f"{path} is not a regular file; artifacts hold plain files only")
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_readonly(root: Path, include_root: bool = True) -> None:
    """chmod a-w on every file and directory under ``root`` (deepest first)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, (stat.S_IMODE(os.lstat(p).st_mode) & ~0o222) | 0o444)
        if include_root or Path(dirpath) != root:
            os.chmod(dirpath, (stat.S_IMODE(os.lstat(dirpath).st_mode) & ~0o222) | 0o555)


def make_writable(root: Path) -> None:
    """chmod u+w on ``root`` and everything under it (so it can be changed or deleted)."""
    if not root.exists():
        return
    if root.is_file():
        os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) | 0o200)
        return
    os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) | 0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o700)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o200)


def remove_tree(path: Path) -> None:
    """Delete a (possibly read-only) directory tree; a missing path is fine."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    make_writable(path)
    shutil.rmtree(path, ignore_errors=True)


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def newest_mtime(path: Path) -> float:
    """Latest modification time of ``path`` or anything under it (0 if it vanished)."""
    try:
        newest = os.lstat(path).st_mtime
    except OSError:
        return 0.0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                pass
    return newest


def copy_tree_writable(src: Path, dest: Path) -> None:
    """Copy a file or folder out of the store as ordinary, writable files."""
    if src.is_dir():
        shutil.copytree(src, dest, copy_function=shutil.copyfile, dirs_exist_ok=True)
        make_writable(dest)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o644)
