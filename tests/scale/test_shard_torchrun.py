"""`icl collect` under torchrun (2 real processes, RANK/WORLD_SIZE from the launcher): rank r
computes shard r/2, rank 0 waits for the other partial and assembles; the result equals the
unsharded artifact of a single process (same key, every HDF5 dataset equal)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.store import Store
from tests.scale.test_shard import _collect, assert_same_h5

HERE = Path(__file__).parent


def test_torchrun_collect_equals_one_process(tiny_toy_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = _collect(tiny_toy_dir)
    res = CliRunner().invoke(app, ["--store", str(one), "-q", *args])
    assert res.exit_code == 0, res.output
    key = res.stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["ICL_THREADS"] = "1"  # the same thread count as the single process (conftest)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(HERE / "shard_worker.py"), "--store", str(two), "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=HERE.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [key]  # rank 0 alone printed, the unsharded key
    assert "assembled 2 shards, 3 tasks, nothing recomputed" in proc.stderr
    store = Store(two)
    parts = store.get(key).manifest["metrics"]["assembled_from"]["parts"]
    assert sorted(store.get(k).params["shard"] for k in parts) == [0, 1]
    assert_same_h5(Store(one).get(key).file("collect.h5"), store.get(key).file("collect.h5"))
