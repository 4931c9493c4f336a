"""Atomic, resumable training checkpoints: one safetensors file, scalars in its JSON header.

The file is written to a temporary name, fsynced, then renamed over `latest.safetensors` (the
previous one is kept as `previous.safetensors`), so a kill -9 at any moment leaves a complete
checkpoint. After a NaN loss the trainer drops a checkpoint written after the last finite step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LATEST = "latest.safetensors"
PREVIOUS = "previous.safetensors"


def save(work_dir: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / f".tmp.{os.getpid()}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
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


def load(work_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The latest checkpoint, or None."""
    from safetensors import safe_open

    for name in (LATEST, PREVIOUS):
        p = work_dir / name
        if p.exists():
            with safe_open(str(p), "pt") as f:
                meta = json.loads(f.metadata()["meta"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, meta
    return None


def drop_latest(work_dir: Path) -> None:
    """Replace the latest checkpoint with the previous one (it holds weights that produced a NaN)."""
    prev, latest = work_dir / PREVIOUS, work_dir / LATEST
    if prev.exists():
        os.replace(prev, latest)
    elif latest.exists():
        latest.unlink()


def step_of(work_dir: Path) -> int | None:
    got = load(work_dir)
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
