"""`icl train-sae` end to end on a tiny random model saved as a local HF folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent.parent / "train_sae"))
from sae_helpers import save_tiny  # noqa: E402

from icl_cli.cli.app import app  # noqa: E402

FAST = ["--width", "128", "--tokens", "5120", "--batch-tokens", "256", "--ctx", "32", "--dataset", "tasks", "--lr", "3e-3", "--eval-tokens", "512"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def icl(store, *args):
    return CliRunner().invoke(app, ["--store", str(store), *args])


def test_json_one_artifact_per_layer_loadable(model_dir, tmp_path):
    r = icl(tmp_path, "--json", "train-sae", "--model", str(model_dir), "--layer", "0,1", "--arch", "topk", "--k", "8", *FAST)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out, list) and len(out) == 2
    for item in out:
        assert set(item["metrics"]) == {"l0", "fvu", "dead_fraction", "ce_recovered"}
        assert item["metrics"]["l0"] <= 8
    from icl_cli.dictionaries import load_dictionary
    from icl_cli.store import Store

    store = Store(tmp_path)
    for item, layer in zip(out, (0, 1)):
        art = store.resolve(item["key"])
        for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "curves.h5"):
            assert (art.path / f).exists(), f
        d = load_dictionary(art)
        assert (d.cfg.layer, d.cfg.site, d.cfg.arch) == (layer, "resid_pre", "topk")
        assert art.metrics["fvu"] == item["metrics"]["fvu"]
    # the same command again reuses both artifacts; -q prints only the keys
    r2 = icl(tmp_path, "-q", "train-sae", "--model", str(model_dir), "--layer", "0", "--layer", "1", "--arch", "topk", "--k", "8", *FAST)
    assert r2.exit_code == 0 and r2.stdout.split() == [o["key"] for o in out]


def test_single_layer_json_is_an_object_and_table(model_dir, tmp_path):
    r = icl(tmp_path, "--json", "train-sae", "--model", str(model_dir), "--layer", "1", "--site", "transcoder", *FAST)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"key", "metrics"}
    r = icl(tmp_path, "train-sae", "--model", str(model_dir), "--layer", "1", "--site", "transcoder", *FAST)
    assert r.exit_code == 0 and "reused" in r.stdout and out["key"][:12] in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--width", "0"], "width"),
    (["--layer", "7"], "out of range"),
    (["--site", "mlp"], "site"),
    (["--arch", "relu"], "architecture"),
    (["--layer", "x"], "cannot read layers"),
])
def test_bad_inputs_one_line_exit_1(model_dir, tmp_path, args, msg):
    base = ["--model", str(model_dir), "--tokens", "512", "--dataset", "tasks"]
    r = icl(tmp_path, "train-sae", *base, *args)
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and msg in errors[0] and "Traceback" not in r.stderr
