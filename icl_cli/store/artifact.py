"""A published artifact (a read-only folder with ``manifest.json``) and the provenance it records."""

from __future__ import annotations

import functools
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol

from icl_cli.core.errors import IntegrityError
from icl_cli.store.fsutil import MANIFEST, hash_file, tree_files
from icl_cli.store.integrity import mark_intact
from icl_cli.store.keys import compute_key

MANIFEST_FORMAT = 1
_ENV_PACKAGES = ("torch", "transformers", "safetensors", "h5py", "numpy", "sae-lens")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the artifact folder ``path``; IntegrityError if it is unreadable."""
    remove = f"remove it with `icl store rm {path.name[:12]}` (or `icl store gc`) and rebuild it"
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path} has no {MANIFEST}; {remove}") from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path / MANIFEST} is unreadable ({' '.join(str(exc).split())}); {remove}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), str):
        raise IntegrityError(f"{path / MANIFEST} is not an artifact manifest; {remove}")
    return manifest


class ArtifactStore(Protocol):
    """What an artifact needs from the store that holds it (``store.Store`` is one); declared here
    so that this module needs nothing above it."""

    root: Path

    def names_of(self, key: str) -> list[str]: ...

    def get(self, key: str) -> Optional["Artifact"]: ...


@dataclass(eq=False)
class Artifact:
    """A published artifact: its key, where it lies, and what its manifest says."""

    store: ArtifactStore
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> str:
        return self.manifest["step"]

    @property
    def params(self) -> dict[str, Any]:
        """Hashed parameters (what the result depends on)."""
        return self.manifest.get("params", {})

    @property
    def speed_params(self) -> dict[str, Any]:
        return self.manifest.get("speed_params", {})

    @property
    def inputs(self) -> dict[str, str]:
        """Input name -> key of the artifact it was made from."""
        return self.manifest.get("inputs", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics") or {}

    @property
    def created(self) -> str:
        return self.manifest.get("created", "")

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Relative path -> {sha256, size} of every data file."""
        return self.manifest.get("files", {})

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())

    @property
    def names(self) -> list[str]:
        """Names that currently point at this artifact."""
        return self.store.names_of(self.key)

    def file(self, name: str) -> Path:
        """Path of a data file of this artifact; IntegrityError if it is missing."""
        path = self.path / name
        if name not in self.files and not path.is_dir():
            have = ", ".join(sorted(self.files)[:8]) or "none"
            raise IntegrityError(f"artifact {self.key[:12]} ({self.step}) has no file {name!r} (files: {have})")
        if not path.exists():
            raise IntegrityError(f"artifact {self.key[:12]} ({self.step}) lost its file {name!r}; run `icl store verify {self.key[:12]}`")
        return path

    def problems(self) -> list[str]:
        """What is wrong with this artifact's files (empty when every hash matches)."""
        out = []
        if self.path.name != self.key or self.manifest.get("key") != self.key:
            out.append(f"{MANIFEST} (key {self.manifest.get('key')!r} does not match folder {self.path.name})")
        try:
            expected_key = compute_key(self.step, self.manifest.get("version", 1), self.params, self.inputs)
        except (KeyError, TypeError, ValueError):
            expected_key = None
        if expected_key != self.key:
            out.append(f"{MANIFEST} (step, params or inputs do not hash to the key)")
        try:
            present = set(tree_files(self.path))
        except OSError as exc:
            return out + [str(exc)]
        for rel, info in sorted(self.files.items()):
            if rel not in present:
                out.append(f"{rel} (missing)")
                continue
            try:
                sha, size = hash_file(self.path / rel)
            except OSError as exc:
                out.append(f"{rel} (unreadable: {exc.strerror or exc})")
                continue
            if sha != info.get("sha256") or size != info.get("size"):
                out.append(f"{rel} (sha256 mismatch)")
        out += [f"{rel} (not in the manifest)" for rel in sorted(present - set(self.files))]
        return out

    def verify(self) -> "Artifact":
        """Re-hash every file; IntegrityError naming the damaged files on any mismatch."""
        bad = self.problems()
        if bad:
            raise IntegrityError(f"artifact {self.key[:12]} ({self.step}) is damaged: " + "; ".join(bad)
                                 + f"; remove it with `icl store rm {self.key[:12]}` and rebuild it")
        mark_intact(self.store.root, self)
        return self

    def __repr__(self) -> str:
        return f"Artifact({self.key[:12]}, step={self.step!r})"


class StepResult(NamedTuple):
    artifact: Artifact
    """The published (or reused) artifact."""
    reused: bool
    """True when an existing artifact was returned without running the step."""


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version and, when the package runs from a git checkout, its commit."""
    import subprocess

    import icl_cli

    out: dict[str, Any] = {"icl_cli": icl_cli.__version__, "git_commit": None}
    repo = Path(icl_cli.__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            res = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5
            )
            if res.returncode == 0:
                out["git_commit"] = res.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return out


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Interpreter and library versions (read from package metadata; nothing is imported)."""
    import importlib.metadata

    env: dict[str, Any] = {"python": platform.python_version(), "platform": sys.platform}
    for name in _ENV_PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    return env
