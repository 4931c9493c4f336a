"""Where tensors must go when accelerate has split a model (``--device-map``).

    device = input_device(model)     # where input_ids go: the embedding's execution device

With a device map, accelerate wraps each module's forward so it runs on an *execution device*
and keeps offloaded weights ("cpu" offload to a GPU, or "disk") on the "meta" device between
passes. ``param.device`` then says "meta" (or the CPU), not where the computation happens, so
the input device is read from accelerate's hook first.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import torch
from torch import nn

_OFFLOAD: list[str] = []


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on, or None when it has no accelerate hook."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is None:
        for sub in getattr(hook, "hooks", ()):  # a SequentialHook holds several
            dev = getattr(sub, "execution_device", None) or dev
    if dev is None:
        return None
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def input_device(model: nn.Module) -> torch.device:
    """Where ``input_ids`` of a forward pass go: the input embedding's execution device.

    Without accelerate: the embedding weight's device. With a device map: the embedding's hook,
    else the first entry of ``model.hf_device_map`` that names a real device.
    """
    embed = model.get_input_embeddings()
    dev = execution_device(embed)
    if dev is not None:
        return dev
    weight = embed.weight
    if weight.device.type != "meta":
        return weight.device
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        if where not in ("disk", "meta"):
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    return torch.device("cpu")


def default_offload_folder() -> str:
    """A temporary folder for weights accelerate offloads to disk, removed when the process ends."""
    if not _OFFLOAD:
        path = tempfile.mkdtemp(prefix="icl-offload-")
        _OFFLOAD.append(path)
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return _OFFLOAD[0]
