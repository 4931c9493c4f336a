"""The content-hashed artifact store: run a step once, find its output again by key or name.

    store = Store("artifacts")
    spec = StepSpec("collect", params=CollectParams(...), inputs={"model": model_art}, version=1)
    res = store.run(spec, build, name="tv-antonyms")     # build(st: Staging) -> metrics | None
    art = store.resolve("tv-antonyms", step="collect")   # full key, prefix >= 6 chars, or name
    art.file("tv.h5")

Layout under ``root``::

    <kk>/<key>/manifest.json + data files   one read-only folder per artifact (kk = key[:2])
    .names/<name>                           one small file per name, holding a key
    .staging/<key>.<pid>.<rand>/            artifacts being written (see staging.py)
    .work/<key>/                            resumable scratch of a step (checkpoints)
    .locks/<key>.lock                       held (flock) while a process computes <key> (lock.py)
    .pins/<pid>.<rand>.pin                  keys a live process reads; gc keeps them (pins.py)
    .verified/<key>.json                    file metadata at the last full hash check (integrity.py)
    .trash/                                 artifacts being deleted (moved here first)

Every artifact a step reads (``resolve``, inputs of ``run``, a reused result) is pinned for the
life of the process and checked against its manifest's sha256 (re-hashed only when its files
changed since the last full check): a damaged input stops the step with exit 3 before anything
is computed from it, and is checked again before the result is published.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icl_cli.core.errors import IclError, IntegrityError
from icl_cli.store import integrity, pins
from icl_cli.store.artifact import MANIFEST_FORMAT, Artifact, StepResult, code_version, environment, read_manifest
from icl_cli.store.fsutil import MANIFEST, atomic_write_text, copy_tree_writable, remove_tree
from icl_cli.store.gc import GcReport, collect_garbage
from icl_cli.store.imports import import_path
from icl_cli.store.keys import KEY_RE, StepSpec, normalise, split_params
from icl_cli.store.lock import key_lock
from icl_cli.store.staging import Build, Log, Staging, finalise, new_staging_dir, now_iso, publish

_logger = logging.getLogger("icl")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,127}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 6
_REUSE_ADVICE = "pass --force to recompute it"

__all__ = ["Build", "Log", "Store", "check_name"]


class Store:
    """A folder of immutable artifacts keyed by what they were computed from."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- paths and listing ------------------------------------------------------------------

    def artifact_path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> Artifact | None:
        """The artifact with this full key, or None if it is not in the store."""
        path = self.artifact_path(key)
        if not (path / MANIFEST).is_file():
            return None
        return Artifact(self, key, path, read_manifest(path))

    def _artifact_dirs(self) -> list[Path]:
        """Every key-named folder of the fan-out layout."""
        if not self.root.is_dir():
            return []
        out = []
        for fan in self.root.iterdir():
            if len(fan.name) == 2 and _HEX_RE.match(fan.name) and fan.is_dir():
                out += [p for p in fan.iterdir() if KEY_RE.match(p.name) and p.is_dir()]
        return sorted(out, key=lambda p: p.name)

    def keys(self) -> list[str]:
        """Full keys of every published artifact."""
        return [p.name for p in self._artifact_dirs() if (p / MANIFEST).is_file()]

    def damaged(self) -> dict[str, str]:
        """Key -> what is wrong, for folders in the layout whose manifest is missing or unreadable."""
        out = {}
        for path in self._artifact_dirs():
            try:
                read_manifest(path)
            except IntegrityError as exc:
                out[path.name] = str(exc)
        return out

    def artifacts(self, step: str | None = None) -> list[Artifact]:
        """Every readable artifact (optionally of one step), oldest first."""
        arts = []
        for key in self.keys():
            try:
                art = self.get(key)
            except IntegrityError as exc:
                _logger.warning("skipping %s: %s", key[:12], exc)
                continue
            if art is not None and (step is None or art.step == step):
                arts.append(art)
        return sorted(arts, key=lambda a: (a.created, a.key))

    # ---- running steps ----------------------------------------------------------------------

    def bind(self, spec: StepSpec) -> StepSpec:
        """The same spec with every input turned into a full key (inputs may be refs or names)."""
        inputs = {}
        for name, value in spec.inputs.items():
            if value is None:
                continue
            inputs[str(name)] = self.use(value).key if isinstance(value, Artifact) else self.resolve(str(value)).key
        return StepSpec(step=spec.step, params=spec.params, inputs=inputs, version=spec.version)

    def use(self, art: Artifact, advice: str | None = None) -> Artifact:
        """Pin ``art`` for this process (gc keeps it) and check its files against the manifest
        (cheaply: integrity.py); IntegrityError naming the damage and how to repair it."""
        pins.pin(self.root, art.key)
        if not (art.path / MANIFEST).is_file():  # swept between finding it and pinning it
            raise IclError(f"artifact {art.key[:12]} ({art.step}) was deleted meanwhile (by `icl store gc` or `rm`); rebuild it")
        integrity.check_intact(self.root, art, advice or (
            f"remove it with `icl store rm {art.key[:12]}`, then rebuild or re-import it"))
        return art

    def lookup(self, spec: StepSpec) -> Artifact | None:
        """The artifact ``spec`` would produce, if it was already produced (checked like a reused
        result: a damaged one is an IntegrityError, not a result)."""
        art = self.get(self.bind(spec).key)
        return None if art is None else self.use(art, advice=_REUSE_ADVICE)

    def run(self, spec: StepSpec, build: Build, name: str | None = None, force: bool = False, log: Log | None = None) -> StepResult:
        """Reuse the artifact of ``spec``, or run ``build`` in a staging folder and publish it.

        ``build(st)`` writes files into ``st.dir`` and may return a metrics dict (stored in the
        manifest). With ``force`` the step runs again and atomically replaces the old artifact.
        """
        say = log or _logger.info
        if name is not None:
            check_name(name)
        spec = self.bind(spec)
        key = spec.key
        if not force:
            art = self._reuse(spec, name, say)
            if art is not None:
                return StepResult(art, True)

        def waiting(holder: str) -> None:
            say(f"waiting for {holder}, which is computing {key[:12]} (step {spec.step}) in this store")

        # One writer per key: a second process waits here, then reuses what the first published.
        with key_lock(self.root, key, on_wait=waiting):
            if not force:
                art = self._reuse(spec, name, say)
                if art is not None:
                    return StepResult(art, True)
            return self._build(spec, build, name, force, say)

    def _reuse(self, spec: StepSpec, name: str | None, say: Log) -> Artifact | None:
        art = self.get(spec.key)
        if art is not None:
            self.use(art, advice=_REUSE_ADVICE)
            say(f"reusing {spec.key[:12]} (step {spec.step}); pass --force to recompute")
            if name is not None:
                self.tag(art, name)
        return art

    def _build(self, spec: StepSpec, build: Build, name: str | None, force: bool, say: Log) -> StepResult:
        """Run ``build`` in a staging folder and publish it (the caller holds the key's lock)."""
        key = spec.key
        hashed, speed = split_params(spec.params)
        work_dir = self.root / ".work" / key
        staging = new_staging_dir(self.root, key)
        st = Staging(staging, key, spec.step, work_dir, device=speed.get("device"))
        say(f"computing {key[:12]} (step {spec.step})")
        try:
            created, started = now_iso(), time.perf_counter()
            metrics = build(st)
            if metrics is not None and not isinstance(metrics, Mapping):
                raise TypeError(f"build for step {spec.step} returned {type(metrics).__name__}; return a dict of metrics or None")
            manifest = {
                "format": MANIFEST_FORMAT,
                "key": key,
                "step": spec.step,
                "version": spec.version,
                "params": hashed,
                "speed_params": speed,
                "inputs": spec.input_keys,
                "names": [name] if name else [],
                "code": code_version(),
                "env": dict(environment(), device=None if st.device is None else str(st.device)),
                "created": created,
                "duration_s": round(time.perf_counter() - started, 3),
                "metrics": normalise(dict(metrics or {}), exact_floats=True),
            }
            finalise(staging, manifest)
            self._recheck_inputs(spec)  # never publish what was computed from a damaged input
            trash = self.root / ".trash" / staging.name
            won = publish(staging, self.artifact_path(key), replace=force, trash=trash)
        except BaseException:
            remove_tree(staging)  # the work dir stays: a rerun resumes from its checkpoints
            raise
        if not won:
            remove_tree(staging)
            say(f"{key[:12]} was published meanwhile by another process; using that copy")
        remove_tree(work_dir)
        pins.pin(self.root, key)
        art = self.get(key)
        if art is None:  # removed between publish and now (a concurrent gc)
            raise IclError(f"artifact {key[:12]} vanished right after publishing; run the command again")
        if won:
            integrity.mark_intact(self.root, art)  # finalise hashed every file a moment ago
        if name is not None:
            self.tag(art, name)
        return StepResult(art, False)

    def _recheck_inputs(self, spec: StepSpec) -> None:
        for input_name, key in spec.input_keys.items():
            art = self.get(key)
            if art is None:
                raise IclError(f"input {input_name} ({key[:12]}) was deleted while step {spec.step} ran; run the command again")
            self.use(art, advice=f"nothing was published; remove it with `icl store rm {key[:12]}`, rebuild it, then rerun")

    def trash(self, key: str) -> Path | None:
        """Move an artifact folder into ``.trash`` (one atomic rename); where it went, or None when
        it was not there. Deleting the folder from the trash is up to the caller."""
        path = self.artifact_path(key)
        if not path.exists():
            return None
        trash = self.root / ".trash" / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(path, 0o755)  # renaming a folder to a new parent needs write access to it
            os.rename(path, trash)
        except FileNotFoundError:
            return None  # someone else removed it first
        integrity.forget(self.root, key)
        with_fan = path.parent
        try:
            with_fan.rmdir()  # the fan-out folder, if now empty
        except OSError:
            pass
        return trash

    def retire(self, key: str) -> bool:
        """Move an artifact out of the way (atomically), then delete it."""
        moved = self.trash(key)
        if moved is None:
            return False
        remove_tree(moved)
        return True

    _retire = retire

    def remove(self, ref: str) -> tuple[str, list[str]]:
        """``icl store rm``: delete one artifact (also one whose manifest or files are damaged) and
        the names that point at it; refused while another process reads it. Returns (key, names)."""
        key = self._key_of(str(ref).strip())
        with pins.sweeping(self.root) as in_use:
            if key in in_use:
                raise IclError(f"artifact {key[:12]} is being read by a running step; remove it when that step is done")
            moved = self.trash(key)
        names = [n for n, k in self.names().items() if k == key]
        for n in names:
            (self.root / ".names" / n).unlink(missing_ok=True)
        if moved is not None:
            remove_tree(moved)
        return key, names

    def _key_of(self, ref: str) -> str:
        """The key a ref means, found from folder and name files alone (no manifest is read)."""
        if KEY_RE.match(ref):
            if self.artifact_path(ref).is_dir():
                return ref
            raise IclError(f"no artifact {ref[:12]}… in store {self.root}; see `icl store ls`")
        names = self.names()
        if ref in names:
            return names[ref]
        if ref and _HEX_RE.match(ref) and len(ref) >= MIN_PREFIX:
            folder = self.root / ref[:2]
            matches = sorted(p.name for p in folder.iterdir() if p.name.startswith(ref) and KEY_RE.match(p.name)) if folder.is_dir() else []
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise IclError(f"key prefix {ref!r} is ambiguous ({len(matches)} artifacts); give more characters")
        raise IclError(f"no artifact or name {ref!r} in store {self.root}; see `icl store ls`")

    # ---- references and names ---------------------------------------------------------------

    def resolve(self, ref: "str | Artifact", step: str | Sequence[str] | None = None, *, check: bool = True) -> Artifact:
        """The artifact a full key, a unique key prefix (>= 6 chars) or a name refers to.

        With ``check`` (what a step reading it wants) it is also pinned and checked (``use``)."""
        art = ref if isinstance(ref, Artifact) else self._resolve(str(ref).strip())
        steps = [step] if isinstance(step, str) else list(step or [])
        if steps and art.step not in steps:
            want = " or ".join(steps)
            raise IclError(f"{ref if isinstance(ref, str) else art.key[:12]} is a {art.step} artifact, not {want}; pass the key or name of a {want} artifact")
        return self.use(art) if check else art

    def find(self, ref: str) -> Artifact | None:
        """The artifact ``ref`` names, or None when it names none (a folder, file or release id);
        a damaged artifact is an IntegrityError, not None."""
        try:
            return self.resolve(ref)
        except IntegrityError:
            raise
        except IclError:
            return None

    def _resolve(self, ref: str) -> Artifact:
        if KEY_RE.match(ref):
            art = self.get(ref)
            if art is None:
                raise IclError(f"no artifact {ref[:12]}… in store {self.root}; see `icl store ls`")
            return art
        names = self.names()
        if ref in names:
            art = self.get(names[ref])
            if art is None:
                raise IclError(f"name {ref!r} points at {names[ref][:12]}, which is no longer in the store; re-tag it with `icl store tag`")
            return art
        if ref and _HEX_RE.match(ref):
            if len(ref) < MIN_PREFIX:
                raise IclError(f"key prefix {ref!r} is too short; give at least {MIN_PREFIX} characters")
            matches = [k for k in self._keys_in_fan(ref[:2]) if k.startswith(ref)]
            if len(matches) == 1:
                return self.get(matches[0])  # type: ignore[return-value]
            if len(matches) > 1:
                raise IclError(f"key prefix {ref!r} is ambiguous: {self._describe(matches)}; give more characters")
        raise IclError(f"no artifact or name {ref!r} in store {self.root}; {self._candidates(ref, names)}")

    def _keys_in_fan(self, fan: str) -> list[str]:
        folder = self.root / fan
        if not folder.is_dir():
            return []
        return [p.name for p in folder.iterdir() if KEY_RE.match(p.name) and (p / MANIFEST).is_file()]

    def _describe(self, keys: Sequence[str], limit: int = 5) -> str:
        parts = []
        for k in list(keys)[:limit]:
            art = self.get(k)
            parts.append(f"{k[:12]} ({art.step if art else '?'})")
        more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(parts) + more

    def _candidates(self, ref: str, names: Mapping[str, str]) -> str:
        close = difflib.get_close_matches(ref, list(names), n=5, cutoff=0.5)
        if close:
            return "did you mean: " + ", ".join(close)
        recent = [a.key for a in self.artifacts()[-5:]][::-1]
        if recent:
            return "recent artifacts: " + self._describe(recent)
        return "the store is empty"

    def names(self) -> dict[str, str]:
        """Every name -> the key it points at."""
        folder = self.root / ".names"
        if not folder.is_dir():
            return {}
        out = {}
        for p in folder.iterdir():
            if _NAME_RE.match(p.name) and p.is_file():
                key = p.read_text(encoding="utf-8").strip()
                if KEY_RE.match(key):
                    out[p.name] = key
        return dict(sorted(out.items()))

    def names_of(self, key: str) -> list[str]:
        return [n for n, k in self.names().items() if k == key]

    def tag(self, ref: "str | Artifact", name: str) -> Artifact:
        """Point ``name`` at an artifact (moving it if it pointed elsewhere); named lineage survives gc."""
        check_name(name)
        art = self.resolve(ref, check=False)
        atomic_write_text(self.root / ".names" / name, art.key + "\n")
        return art

    def untag(self, name: str) -> str:
        """Remove a name; returns the key it pointed at."""
        path = self.root / ".names" / name
        if not _NAME_RE.match(name) or not path.is_file():
            raise IclError(f"no name {name!r} in store {self.root}; see `icl store ls`")
        key = path.read_text(encoding="utf-8").strip()
        path.unlink()
        return key

    # ---- integrity, lineage, import/export, gc ----------------------------------------------

    def verify(self, ref: "str | Artifact") -> Artifact:
        """Re-hash every file of an artifact; IntegrityError naming the damaged files."""
        return self.resolve(ref, check=False).verify()

    def lineage(self, ref: "str | Artifact") -> dict[str, Any]:
        """{key, step, names, inputs: {input name: lineage of that input}} down to the roots."""
        art = self.resolve(ref, check=False)
        node: dict[str, Any] = {"key": art.key, "step": art.step, "names": art.names, "inputs": {}}
        for name, key in art.inputs.items():
            node["inputs"][name] = self.lineage(key) if self.get(key) else {"key": key, "step": None, "missing": True, "inputs": {}}
        return node

    def import_path(self, path: str | os.PathLike, kind: str, name: str | None = None, log: Log | None = None,
                    force: bool = False) -> StepResult:
        """Bring an existing file or folder into the store (kinds: see ``store.imports.KINDS``)."""
        return import_path(self, Path(path), kind, name=name, log=log, force=force)

    def export(self, ref: "str | Artifact", dest: str | os.PathLike) -> Path:
        """Copy an artifact's files (manifest included) into a new folder as writable files."""
        art = self.resolve(ref, check=False)
        dest = Path(dest).expanduser().absolute()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise IclError(f"{dest} already exists and is not an empty folder; choose a new destination")
        art.verify()
        copy_tree_writable(art.path, dest)
        return dest

    def gc(self, older_than_seconds: float = 14 * 86400, dry_run: bool = False) -> GcReport:
        """Delete unnamed artifacts outside named lineage, older than the grace period and read by
        no running step, damaged artifacts, and stale staging/work/lock folders (gc.py)."""
        return collect_garbage(self, older_than_seconds, dry_run)


def check_name(name: str) -> None:
    if not _NAME_RE.match(name or ""):
        raise IclError(f"invalid name {name!r}: use letters, digits and '_.+=-' (up to 128), starting with a letter or digit")
    if _HEX_RE.match(name) and len(name) >= MIN_PREFIX:
        raise IclError(f"invalid name {name!r}: it looks like a key prefix; add a non-hex character")
