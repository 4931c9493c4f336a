"""How many CPU threads torch may use: the CPUs this process may actually run on, not the machine's.

    icl --threads 4 collect ...        # explicit
    ICL_THREADS=1 icl collect ...      # the same through the environment
    icl collect ...                    # default: available_cpus()

torch sizes its thread pool from the machine's core count. In a container, a SLURM allocation or
under ``taskset`` the process may run on far fewer CPUs (CPU affinity) or get only a fraction of
their time (a cgroup CPU quota); a pool larger than that makes threads wait on each other, and
several processes at once then cost several times the CPU time of running them one after another.
The default is therefore the smaller of the affinity set and the cgroup quota (rounded up), never
below 1. An ``OMP_NUM_THREADS`` set by the user is respected when neither ``--threads`` nor
``ICL_THREADS`` is given.

The count is applied once at start-up, before torch does any work: through ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` (read when torch is imported) and, if torch is already imported,
``torch.set_num_threads``.

Idle workers sleep instead of spinning. torch's CPU kernels, MKL and oneDNN share one OpenMP
runtime (GNU libgomp in the Linux wheels) whose default keeps a worker that has finished its
share spinning for a while (hundreds of thousands of pause loops, milliseconds) in case the next
parallel region comes soon. Between the small parallel regions of a hooked forward pass (Python
in between), and above all when other jobs share the CPUs, those spins are most of the CPU
time: a toy collect on 2 CPUs beside two busy jobs took 4-15× the CPU of the same run with
sleeping workers (``benchmarks/cpu_loaded.py``). So ``OMP_WAIT_POLICY=PASSIVE`` (libgomp and
LLVM's libomp) and ``KMP_BLOCKTIME=0`` (Intel's libiomp) are set unless the user set them; the
runtime reads them when it loads, i.e. when torch is imported, so they must be in the
environment before that (``icl`` applies them in its start-up callback, before any command
imports torch). ``OMP_WAIT_POLICY=ACTIVE`` in the environment brings the spinning back.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from icl_cli.core.errors import IclError

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where the cgroup file system is mounted (a module attribute so tests can point it elsewhere)."""

_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
"""OpenMP settings that make idle workers sleep at once (set unless the user set them)."""


def _affinity_cpus() -> int:
    """CPUs in this process's affinity mask (os.cpu_count() where the OS has no affinity API)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """CPUs' worth of time the cgroup allows (quota / period), or None when unlimited or unknown.

    cgroup v2: ``<root>/cpu.max`` holds "QUOTA PERIOD" or "max PERIOD".
    cgroup v1: ``<root>/cpu/cpu.cfs_quota_us`` (-1 = unlimited) and ``cpu.cfs_period_us``
    (also looked up under ``cpu,cpuacct``).
    """
    root = CGROUP_ROOT if root is None else root
    v2 = _read(root / "cpu.max")
    if v2:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                quota, period = int(parts[0]), int(parts[1])
            except ValueError:
                return None
            return quota / period if quota > 0 and period > 0 else None
        return None
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota_s, period_s = _read(root / sub / "cpu.cfs_quota_us"), _read(root / sub / "cpu.cfs_period_us")
        if quota_s is None or period_s is None:
            continue
        try:
            quota, period = int(quota_s), int(period_s)
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def available_cpus(root: Path | None = None) -> int:
    """min(CPUs in the affinity mask, ceil(cgroup quota)), at least 1."""
    n = _affinity_cpus()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def parse_threads(value: str | int | None) -> int | None:
    """A thread count from ``--threads`` / ``ICL_THREADS``: a positive int, or None for "auto"/empty."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "auto", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        raise IclError(f"--threads {value!r} is not a number; give a positive integer or 'auto'") from None
    if n < 0:
        raise IclError(f"--threads {n} is negative; give a positive integer or 'auto'")
    return n


def resolve_threads(requested: str | int | None) -> tuple[int, str]:
    """(thread count, where it came from: "option" | "OMP_NUM_THREADS" | "available CPUs")."""
    n = parse_threads(requested)
    if n is not None:
        return n, "option"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    return available_cpus(), "available CPUs"


def apply_threads(n: int) -> None:
    """Make torch (and the BLAS/OpenMP runtimes below it) use ``n`` intra-op threads whose idle
    workers sleep (WAIT_POLICY, unless already in the environment).

    Sets the environment variables the runtimes read when they load; if torch is already imported
    (tests, notebooks) its pool is resized as well (the wait policy then stays what it was).
    """
    for var in _ENV_VARS:
        os.environ[var] = str(n)
    for var, value in WAIT_POLICY.items():
        os.environ.setdefault(var, value)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)


def configure_threads(requested: str | int | None) -> int:
    """resolve_threads + apply_threads; returns the count in use."""
    n, _ = resolve_threads(requested)
    apply_threads(n)
    return n
