"""--estimate against measured peak memory on the toy model and a tiny random Gemma-2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("estimate_worker.py")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
@pytest.mark.parametrize("which", ["toy", "gemma2"])
def test_estimate_bounds_measured_peak(which):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(WORKER), which], capture_output=True, text=True, env=env, timeout=600,
                         cwd=WORKER.parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    measured = max(r["measured"].values())
    print(f"\n{which}: estimated peak {r['peak'] / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB; "
          + ", ".join(f"{k} {r['estimated'][k] / 2**20:.0f}/{v / 2**20:.0f}" for k, v in r["measured"].items()))
    # an estimate users can trust before an out-of-memory error: never far below, not wildly above
    assert 0.8 <= r["peak"] / measured <= 3.0
    # the heaviest phase is the one the estimate names, or within its margin
    worst = max(r["measured"], key=r["measured"].get)
    assert r["estimated"][worst] >= 0.8 * r["measured"][worst]
