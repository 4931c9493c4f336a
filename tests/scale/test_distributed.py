"""Data-parallel train-sae under torchrun (2 gloo processes on the CPU) equals one process with the
same global batch: same weights, curves and metrics, to float tolerance; rank 0 alone publishes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import COMMON, RUNS  # noqa: E402

from icl_cli.cli.app import app  # noqa: E402
from icl_cli.store import Store  # noqa: E402

HERE = Path(__file__).parent


def _torchrun(store: Path, model: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ICL_THREADS", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(HERE / "ddp_worker.py"), str(store), str(model)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=HERE.parent.parent)


def test_two_ranks_equal_one_process(tmp_path, tiny_toy_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    keys_one = []
    for run in RUNS:  # one process, in this interpreter
        res = CliRunner().invoke(app, ["--store", str(one), "-q", "train-sae", "--model", str(tiny_toy_dir), *run, *COMMON])
        assert res.exit_code == 0, res.output
        keys_one.append(res.stdout.strip())
    proc = _torchrun(two, tiny_toy_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys_two = proc.stdout.split()
    assert keys_two == keys_one  # rank 0 alone printed, and the keys do not depend on the world size
    assert "data-parallel over 2 processes" in proc.stderr
    # every rank's process group is gone with its threads before the interpreter shuts down
    assert proc.stderr.count("backend threads after shutdown: none") == 2, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr

    for key in keys_one:
        a, b = Store(one).get(key), Store(two).get(key)
        assert b is not None
        wa, wb = load_file(a.path / "sae_weights.safetensors"), load_file(b.path / "sae_weights.safetensors")
        assert set(wa) == set(wb)
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-4, msg=f"{a.params['arch']} {name}")
        with h5py.File(a.path / "curves.h5") as fa, h5py.File(b.path / "curves.h5") as fb:
            for k in ("loss", "mse", "l0", "fvu", "dead"):
                torch.testing.assert_close(torch.tensor(fb[k][:]), torch.tensor(fa[k][:]), rtol=1e-3, atol=1e-3, msg=k)
        ma, mb = a.manifest["metrics"], b.manifest["metrics"]
        for k in ("l0", "fvu", "ce_recovered", "dead_fraction", "resampled"):
            assert mb[k] == pytest.approx(ma[k], rel=1e-3, abs=1e-4), k
    assert Store(one).get(keys_one[0]).manifest["metrics"]["resampled"] > 0  # resampling was exercised
    with h5py.File(Store(one).get(keys_one[1]).path / "curves.h5") as f:
        assert f["dead"][:].max() > 0  # and AuxK's dead masks
    assert not any((two / ".work").glob("*"))  # the work dirs were cleared on publishing
