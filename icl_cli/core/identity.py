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
        return folder_fingerprint(folder)
    # an in-memory model (tests): its config and the bytes of its first and last parameters
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]):
        h.update(p.detach().float().cpu().numpy().tobytes()[: 1 << 20])
    return f"mem:{h.hexdigest()[:16]}"


_MODEL_JSON = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}


def folder_fingerprint(folder: Path) -> str:
    """Hash of the files that define a model folder's behaviour (metadata files beside them do not count)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.suffix in (".safetensors", ".bin", ".model") or f.name in _MODEL_JSON:
            h.update(f.name.encode() + str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return f"dir:{h.hexdigest()[:16]}"


def model_info(name_or_path: str, trust_remote_code: bool = False) -> tuple[str | None, int, int]:
    """(fingerprint, n_layers, d_model) of a model from its config alone, without reading weights,
    so a step whose artifact exists is reused without loading the model. The fingerprint is None
    when it can only be known from the loaded model."""
    from icl_cli.core.models import hub_error_message, resolve_source

    source, local = resolve_source(name_or_path)
    if local:  # config.json read directly: importing transformers costs seconds
        sizes = _config_sizes(Path(source) / "config.json")
        if sizes is not None:
            return folder_fingerprint(Path(source)), *sizes
    import transformers as tr

    from icl_cli.core.hub import offline_unless_reachable

    try:
        with offline_unless_reachable():
            cfg = tr.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        from icl_cli.core.errors import IclError

        raise IclError(hub_error_message(str(name_or_path), source, exc)) from exc
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if local:
        fingerprint = folder_fingerprint(Path(source))
    else:
        commit = getattr(cfg, "_commit_hash", None)
        fingerprint = f"hf:{commit}" if commit else None
    return fingerprint, int(text.num_hidden_layers), int(text.hidden_size)


def _config_sizes(path: Path) -> tuple[int, int] | None:
    """(n_layers, d_model) from a config.json by its common key names (text_config first, as
    multimodal models nest it); None when they are not there (then transformers decides)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config") or cfg
    layers = next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg.get(k), int)), None)
    width = next((cfg[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(cfg.get(k), int)), None)
    return None if layers is None or width is None else (layers, width)
