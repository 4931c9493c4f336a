"""Fingerprints that go into artifact keys: which weights, which task data.

Two runs hash to the same key only if they used the same model weights and the same task pairs,
so retraining the toy model or editing a task file never reuses a stale artifact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from icl_cli.core.tasks import Task


def tasks_digest(tasks: Iterable[Task]) -> str:
    """sha256 (first 16 hex) of the tasks' names and pairs, in order."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(json.dumps([t.name, t.pairs], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Identity of a model's weights: the HF commit when known, else a hash of a local folder's files.

    For a local folder, config.json and the first MiB and size of every weights file are hashed
    (cheap even for multi-GB checkpoints, and changed by any retraining).
    """
    cfg = model.config
    commit = getattr(cfg, "_commit_hash", None)
    if commit:
        return f"hf:{commit}"
    folder = Path(getattr(cfg, "_name_or_path", "") or "")
    if folder.is_dir():
        h = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".model"):
                h.update(f.name.encode() + str(f.stat().st_size).encode())
                with f.open("rb") as fh:
                    h.update(fh.read(1 << 20))
        return f"dir:{h.hexdigest()[:16]}"
    # an in-memory model (tests): its config and the bytes of its first and last parameters
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]):
        h.update(p.detach().float().cpu().numpy().tobytes()[: 1 << 20])
    return f"mem:{h.hexdigest()[:16]}"
