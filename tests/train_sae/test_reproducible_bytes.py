"""Two identical train-sae runs give byte-identical artifact files (issue 23, item 9): the same
sha256 for every file, so a rerun can be checked against the first run by hash alone."""

from __future__ import annotations

from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.store import Store


def test_identical_runs_write_identical_files(tmp_path, tiny_toy_dir):
    files = []
    for store in (tmp_path / "a", tmp_path / "b"):
        res = CliRunner().invoke(app, ["--store", str(store), "-q", "train-sae", "--model", str(tiny_toy_dir),
                                       "--layer", "1", "--width", "64", "--tokens", "2048", "--batch-tokens", "128",
                                       "--ctx", "32", "--dataset", "tasks", "--eval-tokens", "256"])
        assert res.exit_code == 0, res.output
        art = Store(store).get(res.stdout.strip())
        files.append({name: info["sha256"] for name, info in art.files.items()})
    assert "sae_weights.safetensors" in files[0] and "sparsity.safetensors" in files[0]
    assert files[0] == files[1]
