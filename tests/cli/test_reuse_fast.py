"""A step whose artifact exists is reused without loading the model or importing torch
(collect, clean, train-sae): each rerun below happens in a fresh interpreter that reports which
heavy modules it imported."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import sys
from icl_cli.cli.app import app
try:
    app(sys.argv[1:], prog_name="icl")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers", "sae_lens") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def _probe(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr
    return out


def _heavy(out: subprocess.CompletedProcess) -> str:
    return [line for line in out.stderr.splitlines() if line.startswith("HEAVY=")][-1][len("HEAVY="):]


@pytest.fixture(scope="module")
def built(tiny_toy_dir, tmp_path_factory):
    """collect, a tiny SAE trained by train-sae, and clean on it, all on the CPU in one store."""
    from typer.testing import CliRunner

    from icl_cli.cli.app import app

    store = str(tmp_path_factory.mktemp("fast") / "s")
    g = ["--store", store, "--device", "cpu"]
    collect = ["collect", "--model", str(tiny_toy_dir), "--tasks", "antonyms,en_fr", "--layers", "0-1", "--n-shot", "3",
               "--n-prompts", "2", "--n-eval", "4"]
    train = ["train-sae", "--model", str(tiny_toy_dir), "--layer", "1", "--width", "64", "--tokens", "2048",
             "--batch-tokens", "256", "--ctx", "32", "--eval-tokens", "256", "--l1", "1", "--dataset", "tasks"]
    runner = CliRunner()
    tv = runner.invoke(app, [*g, "-q", *collect])
    assert tv.exit_code == 0, tv.stderr
    sae = runner.invoke(app, [*g, "-q", *train])
    assert sae.exit_code == 0, sae.stderr
    clean = ["clean", "--tv", tv.stdout.strip(), "--sae", sae.stdout.strip(), "--max-steps", "5", "--patience", "2",
             "--l1-grid", "1,0.1", "--n-train", "6", "--n-val", "6"]
    first = runner.invoke(app, [*g, "--json", *clean])
    assert first.exit_code == 0, first.stderr
    return g, {"collect": (collect, tv.stdout.strip()), "train-sae": (train, sae.stdout.strip()),
               "clean": (clean, json.loads(first.stdout)["key"])}


@pytest.mark.parametrize("step", ["collect", "train-sae", "clean"])
def test_a_reused_step_imports_no_torch(built, step):
    g, steps = built
    args, key = steps[step]
    out = _probe(*g, "-q", *args)
    assert out.stdout.strip() == key  # the same artifact ...
    assert "reusing" in out.stderr
    assert _heavy(out) == ""  # ... found without torch, transformers or the model


def test_the_reused_tables_render_without_torch(built):
    g, steps = built
    for step in ("collect", "clean"):
        out = _probe(*g, *steps[step][0])
        assert _heavy(out) == "" and steps[step][1][:12] in out.stdout


def test_a_new_key_still_takes_the_full_path(built):
    g, steps = built
    args, key = steps["clean"]
    out = _probe(*g, "-q", *[a if a != "1,0.1" else "2,0.1" for a in args])
    assert out.stdout.strip() != key and "torch" in _heavy(out)


def test_the_torch_free_architecture_names_match_the_registry():
    from icl_cli.dictionaries import ARCHS
    from icl_cli.train_sae.config import ARCH_NAMES

    assert set(ARCH_NAMES) == set(ARCHS)
