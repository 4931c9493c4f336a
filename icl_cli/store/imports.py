"""``icl store import``: bring files made elsewhere into the store, under a content key.

The key of an imported artifact hashes the step ``import-<kind>`` and the sha256 of every
source file, so importing the same files twice reuses the first import. Kinds:

* ``sae``   an SAE: a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) or one
            ``.safetensors`` file (e.g. the paper authors' Gemma-1 SAEs). When
            ``icl_cli.dictionaries.io.import_sae(src, dest) -> dict`` exists it converts the
            source; otherwise the files are copied as they are.
* ``tv``    task vectors: an HDF5 file.
* ``model`` a Hugging Face model folder (with ``config.json``).
* ``tasks`` a task file (``{input: output}`` or ``[{"input", "output"}]`` JSON) or a folder of them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from icl_cli.core.errors import IclError
from icl_cli.store.artifact import StepResult
from icl_cli.store.fsutil import hash_file
from icl_cli.store.keys import StepSpec
from icl_cli.store.staging import Build, Log, Staging


class Runner(Protocol):
    """What an import needs from the store (``store.Store`` is one): run a step once."""

    def run(self, spec: StepSpec, build: Build, name: str | None = None, force: bool = False,
            log: Log | None = None) -> StepResult: ...

IMPORT_VERSION = 1
Files = list[tuple[Path, str]]  # (source file, path inside the artifact)
Converter = Callable[[Path, Path], Optional[dict]]


@dataclass(frozen=True)
class Kind:
    name: str
    help: str
    files: Callable[[Path], Files]
    """Check the source and list the files to import (raises IclError on a wrong source)."""
    converter: Callable[[], Optional[Converter]] = lambda: None
    """A function (src, dest) -> info that converts instead of copying, if one is available."""


def _plain_files(src: Path) -> Files:
    if src.is_file():
        return [(src, src.name)]
    out = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue  # skip .git, .cache and friends
        out.append((path, rel.as_posix()))
    if not out:
        raise IclError(f"{src} holds no files to import")
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IclError(f"{path} is not valid JSON ({exc}); fix or replace the file") from exc


def _check_safetensors(path: Path) -> None:
    """Read the 8-byte length and the JSON header of a safetensors file (no tensor is loaded)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise IclError(f"{path} is not a safetensors file ({exc})") from exc


def _sae_files(src: Path) -> Files:
    if src.is_dir():
        if not (src / "cfg.json").is_file() or not (src / "sae_weights.safetensors").is_file():
            raise IclError(f"{src} is not a SAELens folder: it needs cfg.json and sae_weights.safetensors")
        _read_json(src / "cfg.json")
        _check_safetensors(src / "sae_weights.safetensors")
        return _plain_files(src)
    if src.suffix != ".safetensors":
        raise IclError(f"{src}: an SAE import needs a SAELens folder or a .safetensors file")
    _check_safetensors(src)
    return [(src, src.name)]


def _sae_converter() -> Optional[Converter]:
    try:
        mod = importlib.import_module("icl_cli.dictionaries.io")
    except ModuleNotFoundError as exc:
        if exc.name in ("icl_cli.dictionaries.io", "icl_cli.dictionaries"):
            return None  # not written yet: plain copy
        raise
    return getattr(mod, "import_sae", None)


def _tv_files(src: Path) -> Files:
    if not src.is_file():
        raise IclError(f"{src}: a task-vector import needs one HDF5 file")
    import h5py

    try:
        with h5py.File(src, "r"):
            pass
    except OSError as exc:
        raise IclError(f"{src} is not an HDF5 file h5py can open ({exc})") from exc
    return [(src, src.name)]


def _model_files(src: Path) -> Files:
    if not src.is_dir() or not (src / "config.json").is_file():
        raise IclError(f"{src}: a model import needs a Hugging Face model folder with config.json")
    _read_json(src / "config.json")
    return _plain_files(src)


def _check_task_file(path: Path) -> None:
    data = _read_json(path)
    ok_dict = isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items())
    ok_list = isinstance(data, list) and all(
        isinstance(d, dict) and isinstance(d.get("input"), str) and isinstance(d.get("output"), str) for d in data
    )
    if not data or not (ok_dict or ok_list):
        raise IclError(f"{path} is not a task file: expected {{input: output}} or a list of {{\"input\", \"output\"}}")


def _tasks_files(src: Path) -> Files:
    files = [(src, src.name)] if src.is_file() else [(p, p.name) for p in sorted(src.glob("*.json"))]
    if not files:
        raise IclError(f"{src} holds no .json task files")
    for path, _ in files:
        _check_task_file(path)
    return files


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("sae", "SAELens folder or one .safetensors SAE file", _sae_files, _sae_converter),
        Kind("tv", "HDF5 file of task vectors", _tv_files),
        Kind("model", "Hugging Face model folder (config.json)", _model_files),
        Kind("tasks", "task JSON file or folder of them", _tasks_files),
    )
}


def _copy_hashing(src: Path, dest: Path) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dest, "wb") as fo:
        while chunk := fi.read(1 << 20):
            h.update(chunk)
            fo.write(chunk)
    shutil.copymode(src, dest)
    return h.hexdigest()


def import_path(store: Runner, src: Path, kind: str, name: str | None = None, log: Log | None = None,
                force: bool = False) -> StepResult:
    """Import ``src`` as an artifact of step ``import-<kind>``; reuses an identical earlier import
    (``force`` replaces it, e.g. when it was damaged)."""
    if kind not in KINDS:
        raise IclError(f"unknown import kind {kind!r}; choose one of: {', '.join(KINDS)}")
    src = src.expanduser().absolute()
    if not src.exists():
        raise IclError(f"{src} does not exist")
    spec_kind = KINDS[kind]
    convert = spec_kind.converter()
    files = _plain_files(src) if convert is not None else spec_kind.files(src)
    content = {rel: hash_file(path)[0] for path, rel in files}
    params = {"content": content, "via": "convert" if convert is not None else "copy"}
    spec = StepSpec(step=f"import-{kind}", params=params, version=IMPORT_VERSION)

    def build(st: Staging) -> dict[str, Any]:
        info = {"source": str(src), "n_files": len(files), "bytes": sum(p.stat().st_size for p, _ in files)}
        if convert is not None:
            try:
                info.update(convert(src, st.dir) or {})
            except IclError:
                raise
            except Exception as exc:  # a reader's KeyError on a malformed cfg.json, say
                raise IclError(f"could not import {src} as {kind}: {type(exc).__name__}: {exc}") from exc
            return info
        for path, rel in files:
            if _copy_hashing(path, st.path(rel)) != content[rel]:
                raise IclError(f"{path} changed while it was imported; run the import again")
        return info

    return store.run(spec, build, name=name, force=force, log=log)
