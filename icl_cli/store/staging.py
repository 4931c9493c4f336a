"""Writing an artifact: the staging folder a step fills, and the atomic publish that follows.

Publishing, in order (so that a reader never sees a partial artifact and kill -9 at any moment
leaves at most a stale staging folder that ``gc`` removes):

1. the step writes its files into ``root/.staging/<key>.<pid>.<rand>/`` (same file system);
2. every file is hashed and fsynced, then ``manifest.json`` is written last and fsynced;
3. files and sub-folders become read-only and the folder is renamed to ``root/<kk>/<key>/``;
   ``rename`` is atomic, and fails when another process published the same key first, in
   which case our copy is discarded and theirs is used (both writers succeed).
4. Replacing an artifact (``--force``) swaps the new folder with the old one in one
   ``renameat2(RENAME_EXCHANGE)`` and only then deletes the old one (now at the staging path):
   a reader sees the old or the new artifact, never none, and a writer killed in between leaves
   the new artifact published and the old one as a stale staging folder for ``gc``. Where the
   kernel or file system cannot exchange, the old folder is moved aside just before the rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from icl_cli.core.errors import IclError
from icl_cli.store import tensorfile
from icl_cli.store.fsutil import MANIFEST, fsync_dir, hash_file, make_readonly, remove_tree, tree_files

Log = Callable[[str], None]
"""Where the store says what it does (reusing, computing, waiting)."""


class Staging:
    """The folder a step writes its output into before it is published under ``key``."""

    def __init__(self, dir: Path, key: str, step: str, work_dir: Path, device: str | None = None):
        self.dir = dir
        """Write the artifact's files here."""
        self.key = key
        self.step = step
        self._work_dir = work_dir
        self.device = device
        """Device the step ran on (recorded in the manifest); a step may set it."""

    @property
    def work_dir(self) -> Path:
        """Persistent scratch for this key (checkpoints survive a crash; removed after publish)."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    def path(self, fname: str) -> Path:
        """Where to write ``fname`` (a relative path inside the artifact); parents are created."""
        target = (self.dir / fname).resolve()
        if fname == MANIFEST or not target.is_relative_to(self.dir.resolve()) or target == self.dir.resolve():
            raise ValueError(f"{fname!r} is not a valid file name inside an artifact")
        target.parent.mkdir(parents=True, exist_ok=True)
        return self.dir / fname

    def _provenance(self, metadata: Mapping[str, Any] | None) -> dict[str, str]:
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.update(icl_key=self.key, icl_step=self.step)
        return meta

    def save_safetensors(self, fname: str, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
        """Save torch tensors (or numpy arrays) with ``icl_key``/``icl_step`` in the header metadata;
        identical tensors and metadata give identical bytes (tensorfile.py)."""
        return tensorfile.save(self.path(fname), tensors, self._provenance(metadata))

    @contextlib.contextmanager
    def h5(self, fname: str) -> Iterator[Any]:
        """An ``h5py.File`` opened for writing, with ``icl_key``/``icl_step`` root attributes."""
        import h5py

        with h5py.File(self.path(fname), "w") as f:
            f.attrs["icl_key"] = self.key
            f.attrs["icl_step"] = self.step
            yield f

    def write_json(self, fname: str, obj: Any) -> Path:
        """Write ``obj`` as JSON (numpy/torch values, paths and dataclasses converted; NaN as "nan")."""
        from icl_cli.store.keys import normalise

        path = self.path(fname)
        path.write_text(json.dumps(normalise(obj, exact_floats=True), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path


def new_staging_dir(root: Path, key: str) -> Path:
    """``root/.staging/<key>.<pid>.<rand>/``; the pid lets ``gc`` tell a dead writer's leftovers."""
    parent = root / ".staging"
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
    path.mkdir()
    return path


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def finalise(staging: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash and fsync every staged file, then write the manifest last; returns the manifest."""
    if (staging / MANIFEST).exists():
        raise IclError(f"a step may not write {MANIFEST}; the store writes it")
    try:
        rels = tree_files(staging)
    except OSError as exc:
        raise IclError(str(exc)) from exc
    files = {}
    for rel in rels:
        sha, size = hash_file(staging / rel, fsync=True)
        files[rel] = {"sha256": sha, "size": size}
    manifest = dict(manifest, files=files)
    with open(staging / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(staging):
        fsync_dir(Path(dirpath))
    # The top folder stays writable until it is in place: renaming a folder to a new parent
    # needs write permission on it (its ".." entry changes).
    make_readonly(staging, include_root=False)
    return manifest


Build = Callable[[Staging], Optional[Mapping[str, Any]]]
"""A step's computation: writes its files into the staging folder, returns metrics (or None)."""

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(staging: Path, final: Path, replace: bool = False, trash: Optional[Path] = None) -> bool:
    """Rename a finalised staging folder into place; False when ``final`` already exists.

    With ``replace`` an existing ``final`` is swapped out first (point 4 of the module docstring)
    and deleted; ``trash`` is where it is moved aside where the kernel cannot swap."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace and final.exists():
        os.chmod(final, 0o755)  # moving a folder to another parent needs write access to it
        if _exchange(staging, final):
            os.chmod(final, 0o555)
            fsync_dir(final.parent)
            remove_tree(staging)  # the old artifact
            return True
        if trash is not None:
            trash.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, trash)
    try:
        try:
            try:
                os.rename(staging, final)
            except FileNotFoundError:
                if not staging.exists():
                    raise
                final.parent.mkdir(parents=True, exist_ok=True)  # gc removed the empty fan-out folder
                os.rename(staging, final)
        except OSError as exc:
            if final.exists():
                return False  # another writer won the race (EEXIST / ENOTEMPTY)
            if trash is not None and trash.exists():
                os.rename(trash, final)  # put the old artifact back
            raise IclError(f"could not publish {final.name[:12]} into {final.parent}: {exc}") from exc
    finally:
        if trash is not None:
            remove_tree(trash)
    os.chmod(final, 0o555)
    fsync_dir(final.parent)
    return True
