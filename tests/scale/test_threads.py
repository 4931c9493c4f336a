"""Default thread count from the CPUs the process may use (affinity, cgroup quota) and --threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from icl_cli.core import threads
from icl_cli.core.errors import IclError


@pytest.fixture
def cpus(monkeypatch, tmp_path):
    """Fake machine: `set_affinity(n)` fakes the affinity mask, files under the returned root fake cgroups."""
    root = tmp_path / "cgroup"
    root.mkdir()
    monkeypatch.setattr(threads, "CGROUP_ROOT", root)

    def set_affinity(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)

    set_affinity(16)
    return root, set_affinity


def test_affinity_alone_counts(cpus):
    root, set_affinity = cpus
    assert threads.available_cpus() == 16
    set_affinity(3)
    assert threads.available_cpus() == 3


@pytest.mark.parametrize("content, expected", [
    ("150000 100000", 2),   # 1.5 CPUs of time -> 2 threads
    ("400000 100000", 4),
    ("50000 100000", 1),    # half a CPU -> still one thread
    ("max 100000", 16),     # no quota: the affinity mask decides
    ("6400000 100000", 16), # quota above the mask: the mask decides
])
def test_cgroup_v2_quota(cpus, content, expected):
    root, _ = cpus
    (root / "cpu.max").write_text(content + "\n")
    assert threads.available_cpus() == expected


@pytest.mark.parametrize("quota, period, expected", [("-1", "100000", 16), ("300000", "100000", 3), ("250000", "100000", 3)])
def test_cgroup_v1_quota(cpus, quota, period, expected):
    root, _ = cpus
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota)
    (root / "cpu" / "cpu.cfs_period_us").write_text(period)
    assert threads.available_cpus() == expected


def test_quota_and_affinity_take_the_smaller(cpus):
    root, set_affinity = cpus
    (root / "cpu.max").write_text("800000 100000")
    set_affinity(2)
    assert threads.available_cpus() == 2


def test_unreadable_cgroup_falls_back(cpus):
    root, _ = cpus
    (root / "cpu.max").write_text("garbage")
    assert threads.available_cpus() == 16


def test_resolve_order(cpus, monkeypatch):
    root, _ = cpus
    (root / "cpu.max").write_text("200000 100000")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.resolve_threads(None) == (2, "available CPUs")
    assert threads.resolve_threads("auto") == (2, "available CPUs")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.resolve_threads(None) == (5, "OMP_NUM_THREADS")
    assert threads.resolve_threads("7") == (7, "option")
    with pytest.raises(IclError):
        threads.resolve_threads("many")
    with pytest.raises(IclError):
        threads.resolve_threads("-2")


def test_apply_resizes_an_imported_torch(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored after the test
    try:
        threads.apply_threads(1)
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


_PROBE = """
import sys
from icl_cli.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
import torch  # imported only now, as a command would: it must pick up the count
print(torch.get_num_threads())
"""


def _probe(tmp_path, args, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("ICL_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE, "--store", str(tmp_path), *args],
                         capture_output=True, text=True, env=env, timeout=120)
    return out


def test_cli_threads_option_and_env(tmp_path):
    # torch caps a count taken from OMP_NUM_THREADS at import to the machine's cores, so the
    # probes stay at or below them
    two = min(2, os.cpu_count() or 1)
    # --threads after the subcommand is moved to the root (argv.py); torch imported later uses it
    out = _probe(tmp_path, ["store", "ls", "--threads", "1"], {})
    assert out.stdout.strip().splitlines()[-1] == "1", out.stderr
    out = _probe(tmp_path, ["store", "ls"], {"ICL_THREADS": "1"})
    assert out.stdout.strip().splitlines()[-1] == "1", out.stderr
    out = _probe(tmp_path, ["store", "ls", "--threads", str(two)], {"ICL_THREADS": "1"})  # the option wins
    assert out.stdout.strip().splitlines()[-1] == str(two), out.stderr
    out = _probe(tmp_path, ["store", "ls"], {})
    assert out.stdout.strip().splitlines()[-1] == str(threads.available_cpus()), out.stderr


def test_cli_bad_threads_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from icl_cli.cli.app import app

    res = CliRunner().invoke(app, ["--store", str(tmp_path), "store", "ls", "--threads", "lots"])
    assert res.exit_code == 1
    assert "--threads" in res.stderr and "Traceback" not in res.stderr



def _spin_count(env: dict, code: str, args=()) -> int:
    """How long GNU OpenMP's idle workers spin before sleeping, as the runtime under torch
    reports it when it loads (OMP_DISPLAY_ENV=VERBOSE); skips on another OpenMP runtime."""
    import re

    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env={**env, "OMP_DISPLAY_ENV": "VERBOSE"})
    m = re.search(r"GOMP_SPINCOUNT\s*=\s*'(\d+)'", out.stderr)
    if m is None:
        pytest.skip("torch's OpenMP runtime is not GNU libgomp (no GOMP_SPINCOUNT in its settings)")
    return int(m.group(1))


def test_cli_start_up_makes_idle_openmp_workers_sleep(tmp_path):
    # What the runtime under torch uses, not what our code wrote: libgomp prints its settings when
    # it loads (at `import torch`, after the CLI's start-up callback ran).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")}
    args = ["--store", str(tmp_path), "store", "ls"]
    assert _spin_count(env, _PROBE, args) == 0
    # torch alone spins (so the zero above is the CLI's doing)
    assert _spin_count(env, "import torch; torch.ones(4).sum()") > 0
    # a user's own choice is kept
    assert _spin_count({**env, "OMP_WAIT_POLICY": "ACTIVE"}, _PROBE, args) > 0
