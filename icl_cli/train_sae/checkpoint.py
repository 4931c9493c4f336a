"""Atomic, resumable, checked training checkpoints: one safetensors file, scalars in its header.

1. The file is written to a temporary name with the sha256 of its tensor data in its header
   (store/tensorfile.py), fsynced, then renamed over `latest.safetensors`; the one it replaces
   is kept as `previous.safetensors`. A kill -9 at any moment leaves a complete checkpoint.
2. `load` checks the file before trusting it: a checkpoint that is truncated, garbled or whose
   data no longer matches its sha256 is skipped for the previous one (and said so); when none is
   intact, resuming stops with exit 3 instead of training on damaged weights. Damaged files are
   left in place: nothing here deletes the only copy of anything.
3. After a NaN loss the trainer drops a checkpoint written after the last finite step, but only
   for an intact previous one: the last good checkpoint is never deleted.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icl_cli.core.errors import IntegrityError
from icl_cli.store import tensorfile

LATEST = "latest.safetensors"
PREVIOUS = "previous.safetensors"
_logger = logging.getLogger("icl")


def save(work_dir: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / f".tmp.{os.getpid()}.safetensors"
    tensorfile.save(tmp, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    {"meta": json.dumps(meta)}, checksum=True)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    latest = work_dir / LATEST
    if latest.exists():
        os.replace(latest, work_dir / PREVIOUS)
    os.replace(tmp, latest)
    fd = os.open(work_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return latest


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, meta) of an intact checkpoint; ValueError saying what is wrong otherwise."""
    from safetensors import safe_open

    problem = tensorfile.damage(path)
    if problem is not None:
        raise ValueError(problem)
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError, a missing "meta": all mean damage
        raise ValueError(f"it is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError("its header holds no training state")
    return tensors, meta


def load(work_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest intact checkpoint, or None when there is none; IntegrityError when checkpoints
    exist but every one is damaged."""
    damaged = []
    for name in (LATEST, PREVIOUS):
        p = work_dir / name
        if not p.exists():
            continue
        try:
            got = _read(p)
        except ValueError as exc:
            damaged.append(f"{name} ({exc})")
            continue
        if damaged:
            _logger.warning("checkpoint %s is damaged; resuming from %s (step %s)", damaged[0], name, got[1]["step"])
        return got
    if damaged:
        raise IntegrityError(f"the checkpoints in {work_dir} are damaged: {'; '.join(damaged)}; "
                             "rerun without --resume to start the training over")
    return None


def drop_latest(work_dir: Path) -> None:
    """Replace the latest checkpoint with the previous one (it holds weights that produced a NaN),
    when the previous one is intact; otherwise keep it (never delete the last good checkpoint)."""
    prev, latest = work_dir / PREVIOUS, work_dir / LATEST
    if prev.exists() and tensorfile.damage(prev) is None:
        os.replace(prev, latest)


def step_of(work_dir: Path) -> int | None:
    """Step of the newest intact checkpoint (None when there is none, damaged ones included)."""
    try:
        got = load(work_dir)
    except IntegrityError:
        return None
    return None if got is None else int(got[1]["step"])


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            out[f"opt.{i}.{name}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    return out


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)
