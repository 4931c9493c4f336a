"""What a reused step needs to know before it may skip torch: the device and dtype it would run on.

Artifact keys hold the device and dtype of a run. Resolving ``--device auto`` normally asks torch
whether CUDA is available, and importing torch costs seconds; when this machine has no GPU driver
at all, the answer is known without it. Anything less certain returns None and the caller takes
the ordinary path (import torch, or load the model).
"""

from __future__ import annotations

from pathlib import Path

_GPU_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")
"""NVIDIA, ROCm and WSL GPU driver nodes: without any of them torch cannot see a CUDA device."""


def gpu_possible() -> bool:
    """False only when no GPU driver is present (so ``--device auto`` means the CPU)."""
    return any(Path(p).exists() for p in _GPU_NODES)


def cpu_device_dtype(device: str | None, dtype: str | None, device_map: str | None = None) -> tuple[str, str] | None:
    """("cpu", "torch.<dtype>") as str(device), str(dtype) of a run with these options, when that
    run is certain to be on the CPU; None otherwise (a GPU may be used, a device map, an unknown
    name: let the ordinary path decide, and report errors)."""
    from icl_cli.core.models import _DTYPES

    device = (device or "auto").strip().lower()
    if device_map is not None or device not in ("cpu", "auto") or (device == "auto" and gpu_possible()):
        return None
    dtype = (dtype or "auto").strip().lower()
    if dtype == "auto":
        return "cpu", "torch.float32"
    if dtype not in _DTYPES:
        return None
    return "cpu", f"torch.{_DTYPES[dtype]}"
