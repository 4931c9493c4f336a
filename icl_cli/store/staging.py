"""Writing an artifact: the staging folder a step fills, and the atomic publish that follows.

Publishing, in order (so that a reader never sees a partial artifact and kill -9 at any moment
leaves at most a stale staging folder that ``gc`` removes):

1. the step writes its files into ``root/.staging/<key>.<pid>.<rand>/`` (same file system);
2. every file is hashed and fsynced, then ``manifest.json`` is written last and fsynced;
3. files and sub-folders become read-only and the folder is renamed to ``root/<kk>/<key>/``;
   ``rename`` is atomic, and fails when another process published the same key first, in
   which case our copy is discarded and theirs is used (both writers succeed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator, Mapping

from icl_cli.core.errors import IclError
from icl_cli.store.fsutil import MANIFEST, fsync_dir, hash_file, make_readonly, tree_files


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
        """Save torch tensors (or numpy arrays) with ``icl_key``/``icl_step`` in the header metadata."""
        path = self.path(fname)
        meta = self._provenance(metadata)
        first = next(iter(tensors.values()), None)
        if first is not None and type(first).__module__.startswith("numpy"):
            from safetensors.numpy import save_file

            save_file({k: v for k, v in tensors.items()}, str(path), metadata=meta)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        return path

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


def publish(staging: Path, final: Path) -> bool:
    """Rename a finalised staging folder into place; False when ``final`` already exists."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, final)
    except OSError as exc:
        if final.exists():
            return False  # another writer won the race (EEXIST / ENOTEMPTY)
        raise IclError(f"could not publish {final.name[:12]} into {final.parent}: {exc}") from exc
    os.chmod(final, 0o555)
    fsync_dir(final.parent)
    return True
